"""A classifier of noisy embeddings for classifier guidance: z_t [B, L, E] and t -> logits per attribute.

The same pre-norm blocks as the denoiser (bidirectional, adaLN time conditioning), then a mean over
positions and one linear head per attribute.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ddlm_jax.networks import layers
from ddlm_jax.networks import transformer


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """Sizes of `NoisyClassifier`.

  Attributes:
    latent_dim: E, the size of the embeddings it reads.
    num_classes: classes of each attribute it predicts.
    max_len: longest sequence accepted.
    num_layers, num_heads, embed_dim, mlp_dim: the transformer's sizes.
  """
  latent_dim: int
  num_classes: tuple[int, ...]
  max_len: int
  num_layers: int = 2
  num_heads: int = 4
  embed_dim: int = 64
  mlp_dim: int = 256

  def __post_init__(self):
    if not self.num_classes or min(self.num_classes) < 2:
      raise ValueError(f"num_classes needs one entry >= 2 per attribute, got {self.num_classes}")

  @property
  def transformer(self) -> transformer.TransformerConfig:
    return transformer.TransformerConfig(
        vocab_size=1, max_len=self.max_len, num_layers=self.num_layers, num_heads=self.num_heads,
        embed_dim=self.embed_dim, mlp_dim=self.mlp_dim, time_conditioning=True, latent_dim=self.latent_dim)


class NoisyClassifier(nnx.Module):
  """(z_t float[B, L, E], t float32[B]) -> one float32[B, C_a] of logits per attribute."""

  def __init__(self, config: ClassifierConfig, *, rngs: nnx.Rngs):
    self.config = config
    body = config.transformer
    d = body.embed_dim
    self.input_projection = layers.logical_param(
        rngs, layers.fan_in_init(in_axis=0, out_axis=1), (config.latent_dim, d), (None, "embed"))
    self.time_embedding = layers.TimeEmbedding(d, rngs=rngs)
    self.blocks = nnx.List([transformer.Block(body, rngs=rngs) for _ in range(body.num_layers)])
    self.final_norm = layers.RMSNorm(d, rngs=rngs)
    self.head = layers.logical_param(
        rngs, layers.fan_in_init(in_axis=0, out_axis=1), (d, sum(config.num_classes)), ("embed", None))

  def __call__(self, z_BLD: jax.Array, t_B: jax.Array) -> tuple[jax.Array, ...]:
    batch, length = z_BLD.shape[:2]
    x_BLD = z_BLD.astype(jnp.float32) @ self.input_projection[...]
    positions_BL = jnp.broadcast_to(jnp.arange(length), (batch, length))
    c_BC = self.time_embedding(jnp.broadcast_to(t_B, (batch,)))
    for block in self.blocks:
      x_BLD = block(x_BLD, positions_BL, None, c_BC, None)
    logits_BC = self.final_norm(x_BLD).mean(axis=1) @ self.head[...]
    splits = list(jnp.cumsum(jnp.array(self.config.num_classes))[:-1])
    return tuple(jnp.split(logits_BC, [int(i) for i in splits], axis=-1))
