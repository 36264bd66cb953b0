"""Forward processes and their bounds, one file per family; the contract they share is in base.py.

  masked.py          absorbing diffusion in continuous time (MDLM, LLaDA)
  uniform.py         uniform-noise diffusion in continuous time (UDLM)
  d3pm.py            discrete-time D3PM: uniform, absorbing and nearest-neighbour transitions
  block.py           block diffusion (BD3-LM): masked diffusion within blocks, left to right over them
  autoregressive.py  the autoregressive baseline: exact NLL (decoding is in samplers.py)
  gaussian.py        Gaussian diffusion on token embeddings (Diffusion-LM, DiffuSeq): takes an
                     x_0-embedding predictor and the embedding table instead of a logits model_fn
"""
