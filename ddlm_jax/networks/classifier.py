"""A classifier of noisy text for classifier guidance: word posteriors [B, L, V] and t -> logits per attribute.

It reads z_t through the language model's table: each position's word posterior p(w | z_t)
(`GaussianDiffusion.word_log_posterior`) times a learned word table [V, d] is its input, so telling
which words a noisy sequence holds is a lookup rather than something to learn from the geometry of
the embeddings. The same pre-norm blocks as the denoiser follow (bidirectional, adaLN time
conditioning), then a mean over positions and one linear head per attribute.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddlm_jax.networks import layers
from ddlm_jax.networks import transformer


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """Sizes of `NoisyClassifier`.

  Attributes:
    vocab_size: V, the words of the language model it reads.
    num_classes: classes of each attribute it predicts.
    max_len: longest sequence accepted.
    num_layers, num_heads, embed_dim, mlp_dim: the transformer's sizes.
  """
  vocab_size: int
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
        vocab_size=self.vocab_size, max_len=self.max_len, num_layers=self.num_layers, num_heads=self.num_heads,
        embed_dim=self.embed_dim, mlp_dim=self.mlp_dim, time_conditioning=True)


class NoisyClassifier(nnx.Module):
  """(word_probs float32[B, L, V], t float32[B]) -> one float32[B, C_a] of logits per attribute."""

  def __init__(self, config: ClassifierConfig, *, rngs: nnx.Rngs):
    self.config = config
    body = config.transformer
    d = body.embed_dim
    self.word_embedding = layers.logical_param(
        rngs, layers.fan_in_init(in_axis=1, out_axis=0), (config.vocab_size, d), ("vocab", "embed"))
    self.time_embedding = layers.TimeEmbedding(d, rngs=rngs)
    self.blocks = nnx.List([transformer.Block(body, rngs=rngs) for _ in range(body.num_layers)])
    self.final_norm = layers.RMSNorm(d, rngs=rngs)
    self.head = layers.logical_param(
        rngs, layers.fan_in_init(in_axis=0, out_axis=1), (d, sum(config.num_classes)), ("embed", None))

  def __call__(self, word_probs_BLV: jax.Array, t_B: jax.Array) -> tuple[jax.Array, ...]:
    batch, length = word_probs_BLV.shape[:2]
    x_BLD = layers.dense(word_probs_BLV.astype(jnp.float32), self.word_embedding[...])
    positions_BL = jnp.broadcast_to(jnp.arange(length), (batch, length))
    c_BC = self.time_embedding(jnp.broadcast_to(t_B, (batch,)))
    for block in self.blocks:
      x_BLD = block(x_BLD, positions_BL, c_BC, None)
    logits_BC = self.final_norm(x_BLD).mean(axis=1) @ self.head[...]
    return tuple(jnp.split(logits_BC, np.cumsum(self.config.num_classes)[:-1].tolist(), axis=-1))
