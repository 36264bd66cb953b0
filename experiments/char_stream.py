"""Character-level language modelling of any local text file, the text8/enwik8 way.

  python -m ddlm_jax.main --config=experiments/char_stream.py:mdlm --workdir=workdirs/char/mdlm \
      --config.data.paths=PATH/TO/input.txt
  python -m ddlm_jax.main --config=experiments/char_stream.py:ar --workdir=workdirs/char/ar \
      --config.data.paths=PATH/TO/input.txt

The protocol: the file is one stream of characters (every character a token, newline included; the
alphabet is the whole file's); its first 95% trains and its last 5% is held out, cut at a character
(config.data.validation_fraction); every training batch is 256-character windows of the training
stream at fresh random offsets; evaluation scores 64 non-overlapping 256-character windows spread
evenly over the held-out stream (config.eval.max_docs; raise it to cover all of it) and reports bits
per character with two standard errors: the Monte Carlo one and the one over the windows, which
includes it.

Variant `FAMILY[,SIZE]`: FAMILY is a key of `compare.FAMILIES` ('mdlm', 'ar', 'udlm', 'bd3lm_4', ...);
SIZE is 'cpu' (the default: 4 layers of width 128, minutes on a laptop) or 'base' (12 layers of width
768 and 12 heads, batch 512: the text8 setting of D3PM, Austin et al. 2021, that later discrete
diffusion papers kept). `experiments/bpe_stream.py` is the same protocol over sentencepiece tokens.
"""
from ddlm_jax import config as config_lib
from experiments import compare

SIZES = ("cpu", "base")


def get_config(variant: str = "mdlm"):
  family, size = (variant.split(",") + ["cpu"])[:2] if variant.count(",") <= 1 else (None, None)
  if family not in compare.FAMILIES or size not in SIZES:
    raise ValueError(f"unknown variant {variant!r} of char_stream; expected FAMILY[,SIZE] with FAMILY in "
                     f"{sorted(compare.FAMILIES)} and SIZE in {SIZES}")
  config = config_lib.base_config()
  config.process.update(**compare.FAMILIES[family])
  config.data.update(source="text_files", unit="stream", tokenizer="char", packing="pack",
                     train_windows="random", validation_fraction=0.05, seq_len=256)
  config.eval.update(batch_size=32, elbo_samples=4, max_docs=64, rows="spread")
  config.sample.update(num_samples=4, steps=128)
  if size == "cpu":
    config.model.update(num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512)
    config.train.update(batch_size=32, num_steps=2_000, learning_rate=2e-3, warmup_steps=100,
                        log_every=50, eval_every=1_000, checkpoint_every=500)
  else:
    config.model.update(num_layers=12, num_heads=12, embed_dim=768, mlp_dim=3072, dtype="bfloat16")
    config.train.update(batch_size=512, num_steps=1_000_000, learning_rate=3e-4, warmup_steps=2_000,
                        ema_decay=0.9999, log_every=100, eval_every=10_000, checkpoint_every=2_000)
  return config
