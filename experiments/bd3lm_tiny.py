"""Block diffusion (BD3-LM, Arriola et al. 2025) with blocks of 4 tokens, at the tiny size of
`mdlm_tiny`: for tests and a first look.

  python -m ddlm_jax.main --config=experiments/bd3lm_tiny.py --workdir=/tmp/bd3lm_tiny
  python -m ddlm_jax.main --config=experiments/bd3lm_tiny.py --workdir=/tmp/bd3lm_tiny --mode=sample \
      --config.sample.strategy=low_confidence --config.sample.steps_per_block=2

The same data, network and training as `experiments/mdlm_tiny.py` (variants too); only the process
differs. Sampling decodes block by block over an exact KV cache (`ddlm_jax/decoding/blockwise.py`).
Larger siblings: `experiments/compare.py:bd3lm_4` and `compare.py:bd3lm_16` (the README table).
"""
from experiments import compare
from experiments import mdlm_tiny


def get_config(variant: str | None = None):
  config = mdlm_tiny.get_config(variant)
  config.process.update(**compare.FAMILIES["bd3lm_4"])
  return config
