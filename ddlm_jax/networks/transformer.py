"""Pre-norm transformer: the bidirectional denoiser, or (causal) AR baseline.

Positions enter only through RoPE on queries and keys, so any length up to
`max_len` runs on the same parameters. With `time_conditioning` the noise
level t shifts and scales every norm's output adaLN-style (zero-initialised,
so an untrained model ignores t). For placement on a mesh see
`ddlm_jax.sharding.create_sharded_model`.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ddlm_jax.networks import layers

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Sizes and switches of `Transformer`.

  Attributes:
    vocab_size: number of token ids V (including any [MASK] id).
    max_len: longest sequence accepted.
    num_layers: number of blocks.
    num_heads: attention heads H; embed_dim / num_heads must be even (RoPE).
    embed_dim: residual width D.
    mlp_dim: MLP hidden width F.
    causal: causal attention (AR baseline) instead of bidirectional.
    time_conditioning: condition every block on t in [0, 1]; else t is ignored.
    dropout_rate: dropout on the residual branches, applied only when a
      `dropout_key` is passed to the model.
    remat: recompute each block's activations in the backward pass.
    dtype: compute dtype, 'float32' or 'bfloat16'; parameters stay float32
      and logits are float32.
  """
  vocab_size: int
  max_len: int
  num_layers: int = 2
  num_heads: int = 4
  embed_dim: int = 128
  mlp_dim: int = 512
  causal: bool = False
  time_conditioning: bool = False
  dropout_rate: float = 0.0
  remat: bool = False
  dtype: str = "float32"

  def __post_init__(self):
    for name in ("vocab_size", "max_len", "num_layers", "num_heads",
                 "embed_dim", "mlp_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by "
                       f"num_heads ({self.num_heads})")
    if self.head_dim % 2:
      raise ValueError(f"head_dim = embed_dim / num_heads = {self.head_dim} "
                       "must be even for RoPE")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(
          f"dropout_rate must lie in [0, 1), got {self.dropout_rate}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads


class Block(nnx.Module):
  """x + Attn(mod(norm(x))), then x + Mlp(mod(norm(x)))."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    d = config.embed_dim
    self.attn_norm = layers.RMSNorm(d, rngs=rngs)
    self.attn = layers.Attention(d, config.num_heads, dtype=dtype, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(d, rngs=rngs)
    self.mlp = layers.Mlp(d, config.mlp_dim, dtype=dtype, rngs=rngs)
    self.modulation = (layers.Modulation(d, 4, d, rngs=rngs)
                       if config.time_conditioning else None)
    self.dropout_rate = config.dropout_rate

  def __call__(self, x_BLD, positions_BL, mask_BLS, c_BC, dropout_key):
    """x float[B, L, D], positions int[B, L], mask bool[1 or B, L, L] or None,
    c float32[B, C] or None, dropout_key or None -> float[B, L, D]."""
    attn_key, mlp_key = (None, None) if dropout_key is None else (
        jax.random.split(dropout_key))
    attn_mod = mlp_mod = None
    if self.modulation is not None:
      shifts_and_scales = self.modulation(c_BC)
      attn_mod, mlp_mod = shifts_and_scales[:2], shifts_and_scales[2:]

    h_BLD = _norm_and_modulate(self.attn_norm, x_BLD, attn_mod)
    h_BLD = self.attn(h_BLD, positions_BL, mask_BLS)
    x_BLD = x_BLD + layers.dropout(h_BLD, self.dropout_rate, attn_key)

    h_BLD = _norm_and_modulate(self.mlp_norm, x_BLD, mlp_mod)
    h_BLD = self.mlp(h_BLD)
    return x_BLD + layers.dropout(h_BLD, self.dropout_rate, mlp_key)


def _norm_and_modulate(norm, x_BLD, shift_and_scale):
  """norm(x), then adaLN shift and scale when given (time conditioning)."""
  h_BLD = norm(x_BLD)
  return h_BLD if shift_and_scale is None else layers.modulate(
      h_BLD, *shift_and_scale)


class Transformer(nnx.Module):
  """tokens int32[B, L] (and t float32[B]) -> logits float32[B, L, V]."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    d, v = config.embed_dim, config.vocab_size
    self.embedding = layers.logical_param(
        rngs, layers.fan_in_init(in_axis=1, out_axis=0), (v, d),
        ("vocab", "embed"))
    self.time_embedding = (layers.TimeEmbedding(d, rngs=rngs)
                           if config.time_conditioning else None)
    self.blocks = nnx.List(
        [Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = layers.RMSNorm(d, rngs=rngs)
    self.final_modulation = (layers.Modulation(d, 2, d, rngs=rngs)
                             if config.time_conditioning else None)
    self.unembedding = layers.logical_param(
        rngs, layers.fan_in_init(in_axis=0, out_axis=1), (d, v),
        ("embed", "vocab"))

  def __call__(
      self,
      tokens_BL: jax.Array,
      t_B: jax.Array | None = None,
      *,
      dropout_key: jax.Array | None = None,
  ) -> jax.Array:
    """Logits at every position.

    Args:
      tokens_BL: int32[B, L] token ids, L <= max_len.
      t_B: float[B] (or a scalar) noise level in [0, 1]; required with
        time_conditioning, ignored without.
      dropout_key: PRNG key that switches dropout on (training); None: off.

    Returns:
      float32[B, L, V] logits.
    """
    config = self.config
    batch, length = tokens_BL.shape
    if length > config.max_len:
      raise ValueError(
          f"sequence length {length} exceeds max_len {config.max_len}")
    dtype = jnp.dtype(config.dtype)
    x_BLD = jnp.take(self.embedding[...], tokens_BL, axis=0).astype(dtype)
    positions_BL = jnp.broadcast_to(jnp.arange(length), (batch, length))
    mask_BLS = layers.causal_mask(length) if config.causal else None
    c_BC = None
    if self.time_embedding is not None:
      if t_B is None:
        raise ValueError("time_conditioning=True needs the noise level t_B")
      c_BC = self.time_embedding(jnp.broadcast_to(t_B, (batch,)))

    block_fn = nnx.remat(Block.__call__) if config.remat else Block.__call__
    for i, block in enumerate(self.blocks):
      key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
      x_BLD = block_fn(block, x_BLD, positions_BL, mask_BLS, c_BC, key)

    final_mod = (None if self.final_modulation is None
                 else self.final_modulation(c_BC))
    x_BLD = _norm_and_modulate(self.final_norm, x_BLD, final_mod)
    return jnp.einsum("BLD,DV->BLV", x_BLD,
                      self.unembedding[...].astype(dtype),
                      preferred_element_type=jnp.float32)


def num_params(config: TransformerConfig) -> int:
  """Number of scalar parameters of `Transformer(config)`."""
  d, v, f = config.embed_dim, config.vocab_size, config.mlp_dim
  per_block = 4 * d * d + 2 * d * f + 2 * d  # q, k, v, out; mlp; two norms
  total = 2 * v * d + d + config.num_layers * per_block
  if config.time_conditioning:
    modulation = lambda num: d * num * d + num * d
    total += 2 * (d * d + d)  # time-embedding MLP
    total += config.num_layers * modulation(4) + modulation(2)
  return total


def flops_per_token(config: TransformerConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward), PaLM-appendix style.

  6 * N + 12 * num_layers * embed_dim * seq_len, where
  N = num_layers * (4 D^2 + 2 D F) + D V counts the weights of the per-token
  matmuls (attention projections, MLP, output projection); the embedding lookup,
  norms and the per-sequence time conditioning are left out. The second term is
  the q.k and probs.v matmuls over the full L x L score matrix (the causal mask
  does not skip any work here).
  """
  d, f = config.embed_dim, config.mlp_dim
  matmul_params = (config.num_layers * (4 * d * d + 2 * d * f)
                   + d * config.vocab_size)
  return float(6 * matmul_params + 12 * config.num_layers * d * seq_len)
