"""Denoiser networks (Flax NNX)."""
from ddlm_jax.networks.transformer import flops_per_token
from ddlm_jax.networks.transformer import num_params
from ddlm_jax.networks.transformer import Transformer
from ddlm_jax.networks.transformer import TransformerConfig

__all__ = ["Transformer", "TransformerConfig", "flops_per_token", "num_params"]
