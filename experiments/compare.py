"""Every family at equal parameter count and equal training steps: the README's likelihood table.

  python -m ddlm_jax.main --config=experiments/compare.py:udlm --workdir=workdirs/compare/udlm
  python -m ddlm_jax.main --config=experiments/compare.py:ar,shakespeare --workdir=workdirs/compare/ar_shakespeare \
      --config.data.paths=PATH/TO/tinyshakespeare/input.txt

Variant `FAMILY[,DATASET[,SIZE]]`: FAMILY is a key of FAMILIES; DATASET is 'embedded' (the
default: the embedded corpus, BPE tokens, with the generator's exact NLL beside every bound) or
'shakespeare' (a local text file as one stream of characters, the last 5% held out, random
training windows: `char_stream`'s protocol; give its path with --config.data.paths); SIZE is 'cpu' (the default: 4 layers of width 128, the README's table) or
'base' (GPT-2-small-sized, 12 layers of width 768, for an accelerator). Every family trains the
same transformer (no time conditioning, so the parameter counts are equal; the autoregressive
one is causal) with the same optimizer, batch and step count.
"""
from ddlm_jax import config as config_lib

FAMILIES = {
    "mdlm": dict(name="masked", schedule="linear"),
    "udlm": dict(name="uniform", schedule="loglinear"),
    "d3pm_absorbing": dict(name="d3pm", transition="absorbing", schedule="linear", num_steps=1000),
    "d3pm_uniform": dict(name="d3pm", transition="uniform", schedule="cosine", num_steps=1000),
    "d3pm_nearest_neighbor": dict(name="d3pm", transition="nearest_neighbor", schedule="cosine",
                                  num_steps=1000),
    "bd3lm_4": dict(name="block", block_size=4, schedule="linear"),
    "bd3lm_8": dict(name="block", block_size=8, schedule="linear"),
    "bd3lm_16": dict(name="block", block_size=16, schedule="linear"),
    "ar": dict(name="autoregressive"),
}
DATASETS = ("embedded", "shakespeare")
SIZES = ("cpu", "base")
# The memory per device a 'base' config must fit (a v4 or v5e TPU core's 16 GiB), on a mesh of 8 devices:
# benchmarks/compile_check.py and tests/compile_check_test.py check it with `ddlm_jax.compile_check`.
BASE_MEMORY_GIB = 16.0


def get_config(variant: str = "mdlm"):
  parts = variant.split(",")
  family, dataset, size = (parts + ["embedded", "cpu"][len(parts) - 1:])[:3] if len(parts) <= 3 else (None,) * 3
  if family not in FAMILIES or dataset not in DATASETS or size not in SIZES:
    raise ValueError(f"unknown variant {variant!r} of compare; expected FAMILY[,DATASET[,SIZE]] with FAMILY in "
                     f"{sorted(FAMILIES)}, DATASET in {DATASETS} and SIZE in {SIZES}")
  config = config_lib.base_config()
  config.process.update(**FAMILIES[family])
  if dataset == "embedded":
    config.data.update(num_train_docs=50_000, num_eval_docs=500, vocab_size=2048, seq_len=64)
  else:
    config.data.update(source="text_files", unit="stream", tokenizer="char", seq_len=64, packing="pack",
                       train_windows="random")
  config.model.update(num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512)
  config.train.update(batch_size=32, num_steps=1_000, learning_rate=2e-3, warmup_steps=50, log_every=50,
                      eval_every=100_000, checkpoint_every=250)
  config.eval.update(batch_size=100, elbo_samples=4, max_docs=500)
  config.sample.update(num_samples=64, steps=64, strategy="ancestral")
  if size == "base":
    config.data.seq_len = 128 if dataset == "embedded" else 256
    config.model.update(num_layers=12, num_heads=12, embed_dim=768, mlp_dim=3072, dtype="bfloat16")
    config.train.update(batch_size=256, num_steps=100_000, learning_rate=3e-4, warmup_steps=2_000,
                        ema_decay=0.9999, eval_every=5_000, checkpoint_every=2_000)
    config.eval.batch_size = 128  # splits over 8 devices
  return config
