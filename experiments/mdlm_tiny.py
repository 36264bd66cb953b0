"""A tiny masked diffusion LM on the embedded corpus: for tests and a first look (about a minute on a laptop CPU).

  python -m ddlm_jax.main --config=experiments/mdlm_tiny.py --workdir=/tmp/mdlm_tiny
  python -m ddlm_jax.main --config=experiments/mdlm_tiny.py --workdir=/tmp/mdlm_tiny --mode=sample
  python -m ddlm_jax.main --config=experiments/mdlm_tiny.py:char --workdir=/tmp/mdlm_tiny_char

Variants (`:name`): 'char' uses the character tokenizer instead of sentencepiece.
"""
from ddlm_jax import config as config_lib


def get_config(variant: str | None = None):
  config = config_lib.base_config()
  config.data.num_train_docs = 2_000
  config.data.num_eval_docs = 64
  config.data.seq_len = 128
  config.model.update(num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64)
  config.train.update(batch_size=16, num_steps=40, warmup_steps=5, learning_rate=3e-3,
                      log_every=10, eval_every=1_000, checkpoint_every=20)
  config.eval.update(batch_size=16, elbo_samples=2, max_docs=64)
  config.sample.update(num_samples=4, steps=16)
  if variant == "char":
    config.data.update(tokenizer="char", seq_len=320)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of mdlm_tiny; known: 'char'")
  return config
