"""Supervised fine-tuning from a pretrained checkpoint (LLaDA-style SFT) on the embedded corpus's pair tasks.

  python -m ddlm_jax.main --config=experiments/compare.py:mdlm --workdir=workdirs/compare/mdlm_embedded
  python -m ddlm_jax.main --config=experiments/sft.py:mdlm --workdir=workdirs/sft/mdlm
  python -m ddlm_jax.main --config=experiments/compare.py:ar --workdir=workdirs/compare/ar_embedded
  python -m ddlm_jax.main --config=experiments/sft.py:ar --workdir=workdirs/sft/ar
  python -m ddlm_jax.main --config=experiments/sft.py:mdlm --workdir=workdirs/sft/mdlm --mode=sample \\
      --prompt="Describe the restaurant with these facts: name: The Golden Lantern | food: Italian"

Each run starts from the language model of `compare.py` (`config.init_from`, its parameters and
tokenizer; give another with --config.init_from=WORKDIR) and trains on rows [prompt, EOS, response,
EOS, PAD, ...]: the prompt is never noised nor scored; the response, its [EOS] and the padding after
it are, so the model learns where its answer stops, and sampling gives answers of any length up to
the canvas (decoding stops at the first [EOS]).

Variant `FAMILY[,TASK]`: FAMILY 'mdlm' (masked diffusion) or 'ar' (the autoregressive baseline); TASK
'instructions' (the default: both directions, each prompt led by its instruction), 'data_to_text'
or 'text_to_data'. The network and vocabulary are `compare.py`'s (4 layers of width 128, 2,048
sentencepiece ids); rows hold 160 tokens, room for every held-out pair (the pretrained canvas was 64:
positions are relative).
"""
from experiments import seq2seq

TASKS = ("instructions", "data_to_text", "text_to_data")
FAMILIES = ("mdlm", "ar")


def get_config(variant: str = "mdlm"):
  family, task = (variant.split(",") + ["instructions"])[:2] if variant.count(",") <= 1 else (None, None)
  if family not in FAMILIES or task not in TASKS:
    raise ValueError(f"unknown variant {variant!r} of sft; expected FAMILY[,TASK] with FAMILY in {FAMILIES} "
                     f"and TASK in {TASKS}")
  config = seq2seq.get_config(f"{family},data_to_text")
  config.data.task = task
  config.init_from = f"workdirs/compare/{family}_embedded"
  config.data.seq_len = 160
  config.train.update(num_steps=1_000, learning_rate=3e-4, warmup_steps=50)
  return config
