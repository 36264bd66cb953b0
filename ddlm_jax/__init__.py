"""ddlm_jax: diffusion language models in JAX/Flax NNX.

  summary = ddlm_jax.train_and_evaluate(config, workdir)   # train or resume, evaluate
  model = ddlm_jax.load(workdir)                            # -> Pipeline
  model.generate(["The Golden"], steps=64)                  # sample
  model.score(["Some text."]).bits_per_token                # ELBO bound
"""
from ddlm_jax.pipeline import Pipeline
from ddlm_jax.pipeline import load
from ddlm_jax.train import train_and_evaluate

__all__ = ["Pipeline", "load", "train_and_evaluate"]
