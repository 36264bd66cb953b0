"""The reversal evaluation's models (LLaDA's poem table, rebuilt on the embedded corpus): language
models that see a small fixed set of documents many times, then instruction-tuned to complete them.

  python -m ddlm_jax.main --config=experiments/reversal.py:ar --workdir=workdirs/reversal/ar
  python -m ddlm_jax.main --config=experiments/reversal.py:mdlm --workdir=workdirs/reversal/mdlm
  python -m ddlm_jax.main --config=experiments/reversal.py:bd3lm --workdir=workdirs/reversal/bd3lm
  python -m ddlm_jax.main --config=experiments/reversal.py:adapted --workdir=workdirs/reversal/adapted
  python -m ddlm_jax.main --config=experiments/reversal.py:ar,sft --workdir=workdirs/reversal/ar_sft
  python -m ddlm_jax.main --config=experiments/reversal.py:mdlm,sft --workdir=workdirs/reversal/mdlm_sft
  python -m ddlm_jax.main --config=experiments/reversal.py:bd3lm,sft --workdir=workdirs/reversal/bd3lm_sft
  python -m ddlm_jax.main --config=experiments/reversal.py:adapted,sft --workdir=workdirs/reversal/adapted_sft
  python -m benchmarks.reversal

Variant `MODEL[,sft]`. MODEL 'ar' (the autoregressive baseline), 'mdlm' (masked diffusion) and
'bd3lm' (block diffusion, blocks of 4) pretrain `compare.py`'s network on the first NUM_DOCUMENTS
documents of the embedded corpus's training split until they are memorised, like LLaDA's poems:
1,000 steps of 32 rows for 'ar' (each document seen 250 times), 3,000 for the diffusion models,
which memorise more slowly. 'adapted' turns the 'ar' run into masked diffusion (`config.init_from`,
shifted logits, attention annealed over 100 steps) for 1,000 steps at the fine-tuning rate, so
that it keeps what the AR model memorised. ',sft' fine-tunes that run (init_from
workdirs/reversal/MODEL) for 500 steps on task 'completion' (given one half of a document, write
the other; both directions) over the first NUM_SFT_DOCUMENTS documents only: the last
NUM_DOCUMENTS - NUM_SFT_DOCUMENTS, memorised in pretraining and never seen in the instruction
format, are the evaluation's (`ddlm_jax.reversal`).
"""
from experiments import compare

NUM_DOCUMENTS = 128
NUM_SFT_DOCUMENTS = 96
MODELS = ("ar", "mdlm", "bd3lm", "adapted")
NETWORKS = {"ar": "ar", "mdlm": "mdlm", "bd3lm": "bd3lm_4", "adapted": "mdlm"}
ROOT = "workdirs/reversal"


def get_config(variant: str = "mdlm"):
  model, *rest = variant.split(",")
  if model not in MODELS or rest not in ([], ["sft"]):
    raise ValueError(f"unknown variant {variant!r} of reversal; expected MODEL[,sft] with MODEL in {MODELS}")
  config = compare.get_config(NETWORKS[model])
  config.data.update(num_train_docs=NUM_DOCUMENTS, num_eval_docs=64)
  config.train.update(num_steps=1_000 if model == "ar" else 3_000, checkpoint_every=500)
  config.eval.max_docs = 64
  if model == "adapted":
    config.init_from = f"{ROOT}/ar"
    config.model.shift_logits = True
    config.train.update(num_steps=1_000, learning_rate=3e-4, attention_anneal_steps=100)
  if rest:
    config.init_from = f"{ROOT}/{model}"
    config.data.update(task="completion", num_train_docs=NUM_SFT_DOCUMENTS, seq_len=128)
    config.train.update(num_steps=500, learning_rate=3e-4, warmup_steps=50, attention_anneal_steps=0)
  return config
