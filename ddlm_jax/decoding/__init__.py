"""Decoders beyond the fixed-grid scan of `ddlm_jax.samplers`: block-by-block decoding with a KV
cache, and speculative diffusion decoding."""
