"""Diffusion-LM (Li et al. 2022): Gaussian diffusion on learned token embeddings, end to end.

  python -m ddlm_jax.main --config=experiments/diffusion_lm.py --workdir=workdirs/diffusion_lm
  python -m ddlm_jax.main --config=experiments/diffusion_lm.py:base --workdir=workdirs/diffusion_lm_base
  python -m ddlm_jax.main --config=experiments/diffusion_lm.py --workdir=/tmp/dlm \\
      --config.data.source=text_files --config.data.paths=PATH/TO/text.txt

Variants: 'cpu' (the default: the README's control table, 4 layers of width 128 on the embedded
corpus) and 'base' (Diffusion-LM's E2E setting: a BERT-base-sized 12 x 768 transformer, embeddings
of size 16, T = 2000, the sqrt schedule; for an accelerator). The held-out bound is in bits per
token through the rounding term.
"""
from ddlm_jax import config as config_lib

VARIANTS = ("cpu", "base")


def get_config(variant: str = "cpu"):
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of diffusion_lm; known: {VARIANTS}")
  config = config_lib.base_config()
  config.process.update(name="gaussian", schedule="sqrt", num_steps=2_000, latent_dim=16)
  config.data.update(num_train_docs=50_000, num_eval_docs=500, vocab_size=2048, seq_len=64)
  config.model.update(num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512, time_conditioning=True)
  config.train.update(batch_size=64, num_steps=3_000, learning_rate=1e-3, warmup_steps=100, log_every=50,
                      eval_every=100_000, checkpoint_every=500)
  config.eval.update(batch_size=100, elbo_samples=4, max_docs=500)
  config.sample.update(num_samples=64, steps=200, strategy="ancestral", clamp=True)
  if variant == "base":
    config.model.update(num_layers=12, num_heads=12, embed_dim=768, mlp_dim=3072, dtype="bfloat16")
    config.train.update(batch_size=64, num_steps=200_000, learning_rate=1e-4, warmup_steps=2_000,
                        ema_decay=0.9999, eval_every=10_000, checkpoint_every=5_000)
    config.sample.steps = 2_000
    config.eval.batch_size = 104  # divides over a pod slice's 8 devices
  return config
