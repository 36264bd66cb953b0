"""ddlm_jax: diffusion language models in JAX/Flax NNX.

  summary = ddlm_jax.train_and_evaluate(config, workdir)   # train or resume, evaluate
  model = ddlm_jax.load(workdir)                            # -> Pipeline
  model.generate(["The Golden"], steps=64)                  # sample
  model.score(["Some text."]).bits_per_token                # ELBO bound

The three names are imported on first use, so that importing a submodule (the pure maths in
`ddlm_jax.samplers`, say) does not import training.
"""
import importlib

_HOMES = {"Pipeline": "ddlm_jax.pipeline", "load": "ddlm_jax.pipeline", "train_and_evaluate": "ddlm_jax.train"}

__all__ = ["Pipeline", "load", "train_and_evaluate"]


def __getattr__(name: str):
  if name not in _HOMES:
    raise AttributeError(f"module 'ddlm_jax' has no attribute {name!r}")
  return getattr(importlib.import_module(_HOMES[name]), name)
