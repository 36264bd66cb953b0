"""Diffusion-LM at the tiny size of `mdlm_tiny`: for tests and a first look.

  python -m ddlm_jax.main --config=experiments/diffusion_lm_tiny.py --workdir=/tmp/diffusion_lm_tiny
  python -m ddlm_jax.main --config=experiments/diffusion_lm_tiny.py --workdir=/tmp/diffusion_lm_tiny --mode=sample

The data and training of `experiments/mdlm_tiny.py` (variants too) with the Gaussian process on
learned embeddings of size 8; the real sizes are in `experiments/diffusion_lm.py`.
"""
from experiments import mdlm_tiny


def get_config(variant: str | None = None):
  config = mdlm_tiny.get_config(variant)
  config.process.update(name="gaussian", schedule="sqrt", num_steps=200, latent_dim=8)
  config.model.time_conditioning = True
  config.sample.update(strategy="ancestral", clamp=True)
  return config
