"""Building blocks of the denoiser: norms, RoPE, attention, MLP, time embedding.

Every parameter is float32 and carries logical axis names in its `out_sharding`
metadata (e.g. ('embed', 'mlp')). The names are annotations only
(`eager_sharding=False`), so a module can be built on one device with no mesh;
`ddlm_jax.sharding` maps the names to mesh axes and places the parameters.

`attention` is the one attention function of every mask (bidirectional,
causal, any boolean mask such as a block-causal one), with the implementations
of ATTENTION_IMPLEMENTATIONS. Attention also runs over a cache
(`Attention.decode`): the keys and values of the other positions live in a
`KVCache`, an explicit pytree passed in and returned, so decoding stays a pure
function under `jax.jit` and `lax.scan`; `cached_attention` reads only the
part of the cache a query sees (up to its own position for causal decoding,
to the end of its block for block diffusion, everything for a bidirectional
model decoding with an approximate cache).

Shape letters: B batch, L query length, S key length, T tokens fed in one
decoding call, D embed, H heads, K head dim, F mlp hidden, C conditioning,
N number of modulation vectors.
"""
from collections.abc import Callable, Sequence
import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]


def logical_param(
    rngs: nnx.Rngs,
    init_fn: Initializer,
    shape: Sequence[int],
    names: Sequence[str | None],
) -> nnx.Param:
  """A float32 parameter annotated with one logical axis name per dimension."""
  if len(names) != len(shape):
    raise ValueError(f"{len(names)} logical names {names} for shape {shape}")
  value = init_fn(rngs.params(), tuple(shape), jnp.float32)
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def fan_in_init(in_axis, out_axis) -> Initializer:
  """Truncated-normal init with variance 1 / fan_in over `in_axis`."""
  return nnx.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


def dense(x: jax.Array, kernel: jax.Array, *, contracting: int = 1,
          preferred_element_type: jnp.dtype | None = None) -> jax.Array:
  """x[..., C1..Cn] @ kernel[C1..Cn, O1..Om] -> [..., O1..Om], with n = `contracting`.

  Computed as one 2-D matmul [tokens, prod(C)] x [prod(C), prod(O)]: a matmul on [B, L, D]
  contracts both B and L in its weight gradient, for which XLA's CPU backend writes transposed
  copies of the activations, while the flattened form runs plain matmuls in both passes (a
  6-layer MLP's forward and backward at [16, 256, 256]: 882 ms -> 446 ms on 2 CPU cores).
  """
  lead_shape = x.shape[:x.ndim - contracting]
  in_shape, out_shape = kernel.shape[:contracting], kernel.shape[contracting:]
  if x.shape[x.ndim - contracting:] != in_shape:
    raise ValueError(f"dense: input {x.shape} does not end in the kernel's input axes {in_shape}")
  y = jnp.dot(x.reshape(math.prod(lead_shape), math.prod(in_shape)),
              kernel.reshape(math.prod(in_shape), math.prod(out_shape)),
              preferred_element_type=preferred_element_type)
  return y.reshape(*lead_shape, *out_shape)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity when `key` is None or `rate` is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class RMSNorm(nnx.Module):
  """Root-mean-square norm with a learned scale, computed in float32."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6):
    self.scale = logical_param(rngs, nnx.initializers.ones, (dim,), ("embed",))
    self.eps = eps

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    x = x_BLD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...]).astype(x_BLD.dtype)


def apply_rope(
    x_BLHK: jax.Array, positions_BL: jax.Array, max_wavelength: float = 1e4
) -> jax.Array:
  """Rotary position embedding (rotate-half layout) at integer positions.

  Pair (x[i], x[i + K/2]) is rotated by angle position * max_wavelength^(-2i/K),
  so q.k after rotation depends on the positions only through their difference.
  """
  half = x_BLHK.shape[-1] // 2
  inv_freq_J = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_BLJ = positions_BL[..., None].astype(jnp.float32) * inv_freq_J
  sin_BL1J = jnp.sin(angles_BLJ)[:, :, None, :]
  cos_BL1J = jnp.cos(angles_BLJ)[:, :, None, :]
  x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate(
      [x1 * cos_BL1J - x2 * sin_BL1J, x2 * cos_BL1J + x1 * sin_BL1J], axis=-1)
  return rotated.astype(x_BLHK.dtype)


ATTENTION_IMPLEMENTATIONS = ("xla", "chunked", "cudnn")


def attention(
    q_BTHK: jax.Array,
    k_BSHK: jax.Array,
    v_BSHK: jax.Array,
    *,
    causal: bool = False,
    mask_BTS: jax.Array | None = None,
    implementation: str = "xla",
    chunk_size: int = 64,
) -> jax.Array:
  """Softmax attention of T queries over S keys, float32 logits: [B, T, H, K].

  Args:
    q_BTHK, k_BSHK, v_BSHK: queries, keys, values.
    causal: query t sees keys s <= t only (needs T == S).
    mask_BTS: optional bool[B or 1, T or 1, S], True where a query may look
      (e.g. a block-causal mask; [B, 1, S]: the keys every query of a row
      sees); combined with `causal`. Every query must see a key.
    implementation: one of ATTENTION_IMPLEMENTATIONS.
      'xla': `jax.nn.dot_product_attention`'s XLA path, the whole T x S score
        matrix, then the mask.
      'chunked': causal attention by query blocks of `chunk_size`, each against
        the keys up to its own end only (and its slice of `mask_BTS`), so the
        masked upper triangle is never computed (about half the score work at
        T = S); without `causal` as 'xla'.
      'cudnn': cuDNN's fused flash attention (NVIDIA GPUs, float16/bfloat16).
    chunk_size: query block of 'chunked'.
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one "
                     f"of {ATTENTION_IMPLEMENTATIONS}")
  length = q_BTHK.shape[1]
  if causal and k_BSHK.shape[1] != length:
    raise ValueError(f"causal attention needs as many keys as queries, got "
                     f"{k_BSHK.shape[1]} keys for {length} queries")
  if implementation == "chunked" and causal:
    blocks = []
    for start in range(0, length, chunk_size):
      end = min(start + chunk_size, length)
      chunk_mask_BTS = block_causal_mask(start, end - start, end, 1)
      if mask_BTS is not None:
        rows_BTS = mask_BTS if mask_BTS.shape[1] == 1 else mask_BTS[:, start:end]
        chunk_mask_BTS = chunk_mask_BTS & rows_BTS[:, :, :end]
      blocks.append(_masked_attention(q_BTHK[:, start:end], k_BSHK[:, :end],
                                      v_BSHK[:, :end], chunk_mask_BTS))
    return jnp.concatenate(blocks, axis=1)
  if causal:
    causal_1TS = block_causal_mask(0, length, length, 1)
    mask_BTS = causal_1TS if mask_BTS is None else mask_BTS & causal_1TS
  if implementation == "cudnn":
    if jax.default_backend() != "gpu":
      raise ValueError("attention implementation 'cudnn' needs an NVIDIA GPU, "
                       f"the backend is {jax.default_backend()!r}")
    return _masked_attention(q_BTHK, k_BSHK, v_BSHK, mask_BTS, "cudnn")
  return _masked_attention(q_BTHK, k_BSHK, v_BSHK, mask_BTS)


def _masked_attention(q_BTHK, k_BSHK, v_BSHK, mask_BTS, implementation="xla"):
  """`jax.nn.dot_product_attention` (logits and softmax in float32) with an
  optional bool[B or 1, T or 1, S] mask (spread over the T queries, as cuDNN
  reads it)."""
  if mask_BTS is not None:
    mask_BTS = jnp.broadcast_to(mask_BTS, (mask_BTS.shape[0], q_BTHK.shape[1], k_BSHK.shape[1]))
  return jax.nn.dot_product_attention(
      q_BTHK, k_BSHK, v_BSHK,
      mask=None if mask_BTS is None else mask_BTS[:, None],
      implementation=implementation)


def block_causal_mask(start: jax.Array | int, num_queries: int, num_keys: int,
                      block_size: int) -> jax.Array:
  """bool[1, T, S]: query t, at position start + t, sees the keys of its own
  block of `block_size` positions and of every block before it (block_size 1:
  causal)."""
  query_blocks_T1 = (start + jnp.arange(num_queries)[:, None]) // block_size
  return (jnp.arange(num_keys)[None, :] // block_size <= query_blocks_T1)[None]


def annealed_causal_mask(key: jax.Array, length: int,
                         ratio: jax.Array | float) -> jax.Array:
  """bool[1, L, L]: a causal mask with each later key also visible with
  probability `ratio` (independent draws from `key`): exactly causal at ratio
  0, exactly bidirectional at 1. Annealing `ratio` from 0 to 1 while training
  turns an autoregressive network's attention bidirectional (Gong et al. 2024,
  DiffuLLaMA's attention-mask annealing)."""
  later_visible_LL = jax.random.uniform(key, (length, length)) < ratio
  return (block_causal_mask(0, length, length, 1)[0] | later_visible_LL)[None]


def annealed_block_diffusion_mask(key: jax.Array, length: int, block_size: int,
                                  ratio: jax.Array | float) -> jax.Array:
  """bool[1, 2L, 2L]: `block_diffusion_mask` with attention within a block
  annealed from causal: each query of either copy sees the keys of its own
  block up to its own position, and each later one with probability `ratio`
  (independent draws from `key`). At ratio 0 every query attends as in an
  autoregressive network (to the clean blocks before it and its own block up
  to itself), at 1 the mask is exactly `block_diffusion_mask` (AR -> block
  diffusion adaptation)."""
  blocks_L = jnp.arange(length) // block_size
  same_block_LL = blocks_L[:, None] == blocks_L[None, :]
  earlier_block_LL = blocks_L[:, None] > blocks_L[None, :]
  later_visible_2LL = jax.random.uniform(key, (2, length, length)) < ratio
  within_2LL = same_block_LL & (block_causal_mask(0, length, length, 1) | later_visible_2LL)
  noised_2LL = jnp.concatenate([within_2LL[0], earlier_block_LL], axis=1)
  clean_2LL = jnp.concatenate([jnp.zeros_like(same_block_LL), within_2LL[1] | earlier_block_LL], axis=1)
  return jnp.concatenate([noised_2LL, clean_2LL], axis=0)[None]


def block_diffusion_mask(length: int, block_size: int) -> jax.Array:
  """bool[1, 2L, 2L]: the mask of a block-diffusion training pass over the
  noised and the clean copy of a sequence side by side, [x_t, x_0] (BD3-LM).

  A noised token sees the noised tokens of its own block and the clean tokens
  of the blocks before it; a clean token sees the clean tokens of its own
  block and the blocks before it (block-causal). No token sees a later block,
  and a noised token never sees its own block's clean copy.
  """
  blocks_L = jnp.arange(length) // block_size
  same_block_LL = blocks_L[:, None] == blocks_L[None, :]
  earlier_block_LL = blocks_L[:, None] > blocks_L[None, :]
  noised_2LL = jnp.concatenate([same_block_LL, earlier_block_LL], axis=1)
  clean_2LL = jnp.concatenate([jnp.zeros_like(same_block_LL), same_block_LL | earlier_block_LL], axis=1)
  return jnp.concatenate([noised_2LL, clean_2LL], axis=0)[None]


@flax.struct.dataclass
class KVCache:
  """Rotated keys and values of one attention layer at positions [0, S).

  Heads come before positions, so that attention reads the cache as batched
  [S, K] matrices without transposing it. Slots from the first position not
  yet written on are never read (`cached_attention`).

  Attributes:
    k_BHSK: keys (RoPE applied at their absolute positions).
    v_BHSK: values.
  """
  k_BHSK: jax.Array
  v_BHSK: jax.Array

  @classmethod
  def zeros(cls, batch_size: int, max_len: int, num_heads: int, head_dim: int,
            dtype: jnp.dtype) -> "KVCache":
    shape = (batch_size, num_heads, max_len, head_dim)
    return cls(k_BHSK=jnp.zeros(shape, dtype), v_BHSK=jnp.zeros(shape, dtype))

  @property
  def max_len(self) -> int:
    return self.k_BHSK.shape[2]

  def write(self, k_BTHK: jax.Array, v_BTHK: jax.Array,
            start: jax.Array | int) -> "KVCache":
    """The cache with positions [start, start + T) overwritten.

    `start + T <= S` is the caller's to guarantee: `lax.dynamic_update_slice`
    clamps a start that runs past the end instead of failing.
    """
    index = (0, 0, jnp.asarray(start, jnp.int32), 0)
    update = lambda cache, new_BTHK: jax.lax.dynamic_update_slice(
        cache, new_BTHK.transpose(0, 2, 1, 3).astype(cache.dtype), index)
    return KVCache(k_BHSK=update(self.k_BHSK, k_BTHK),
                   v_BHSK=update(self.v_BHSK, v_BTHK))


def cached_attention(q_BTHK: jax.Array, cache: KVCache, start: jax.Array | int,
                     chunk_size: int = 32, visible_block: int = 1) -> jax.Array:
  """Attention of queries at positions [start, start + T) over a cache.

  A query at position p sees the cached keys of its own block of
  `visible_block` positions and of every block before it: key positions j
  with j // visible_block <= p // visible_block. visible_block 1 is causal
  attention (autoregressive decoding), a block size is block-causal attention
  (block diffusion), the cache's length is bidirectional attention over the
  whole cache. Reads only the cache's chunks of `chunk_size` slots up to the
  last visible position (a loop with a traced trip count), combining them
  with a running softmax (max, normaliser, weighted sum), so a step early in a
  long canvas costs little. Equals the masked softmax over the visible
  positions to float32 rounding.

  Args:
    q_BTHK: queries (rotated at their positions).
    cache: keys and values of every position a query sees.
    start: int32 scalar (may be traced), position of the first query.
    chunk_size: slots read per loop step (at most the cache's length).
    visible_block: see above (static).

  Returns:
    float[B, T, H, K].
  """
  num_queries, head_dim = q_BTHK.shape[1], q_BTHK.shape[3]
  max_len = cache.max_len
  chunk = min(chunk_size, max_len)
  q_BHTK = q_BTHK.transpose(0, 2, 1, 3)
  query_blocks_T1 = (start + jnp.arange(num_queries)[:, None]) // visible_block

  def read_chunk(index, carry):
    max_BHT, normaliser_BHT, weighted_BHTK = carry
    # The last chunk may run past the cache's end: read the chunk that ends
    # there instead, and skip the slots an earlier chunk has read.
    offset = jnp.minimum(index * chunk, max_len - chunk)
    k_BHCK = jax.lax.dynamic_slice_in_dim(cache.k_BHSK, offset, chunk, axis=2)
    v_BHCK = jax.lax.dynamic_slice_in_dim(cache.v_BHSK, offset, chunk, axis=2)
    key_positions_C = offset + jnp.arange(chunk)
    visible_TC = ((key_positions_C // visible_block <= query_blocks_T1)
                  & (key_positions_C >= index * chunk))
    logits_BHTC = head_dim ** -0.5 * jnp.einsum(
        "BHTK,BHCK->BHTC", q_BHTK, k_BHCK, preferred_element_type=jnp.float32)
    logits_BHTC = jnp.where(visible_TC, logits_BHTC, -jnp.inf)
    new_max_BHT = jnp.maximum(max_BHT, logits_BHTC.max(axis=-1))
    rescale_BHT = jnp.exp(max_BHT - new_max_BHT)
    probs_BHTC = jnp.exp(logits_BHTC - new_max_BHT[..., None])
    normaliser_BHT = normaliser_BHT * rescale_BHT + probs_BHTC.sum(axis=-1)
    weighted_BHTK = (weighted_BHTK * rescale_BHT[..., None] + jnp.einsum(
        "BHTC,BHCK->BHTK", probs_BHTC.astype(v_BHCK.dtype), v_BHCK,
        preferred_element_type=jnp.float32))
    return new_max_BHT, normaliser_BHT, weighted_BHTK

  batch, num_heads = q_BHTK.shape[:2]
  stats_shape = (batch, num_heads, num_queries)
  initial = (jnp.full(stats_shape, -jnp.inf, jnp.float32),
             jnp.zeros(stats_shape, jnp.float32),
             jnp.zeros((*stats_shape, head_dim), jnp.float32))
  visible_end = jnp.minimum(
      ((start + num_queries - 1) // visible_block + 1) * visible_block, max_len)
  num_chunks = (visible_end + chunk - 1) // chunk
  _, normaliser_BHT, weighted_BHTK = jax.lax.fori_loop(
      0, num_chunks, read_chunk, initial)
  out_BHTK = weighted_BHTK / normaliser_BHT[..., None]
  return out_BHTK.transpose(0, 2, 1, 3).astype(q_BTHK.dtype)


class Attention(nnx.Module):
  """Multi-head self-attention with RoPE on queries and keys.

  Attributes (static):
    causal: queries see only keys at or before their position.
    block_size: > 0: block-causal attention (block diffusion): queries see
      the keys of their own block of `block_size` positions and of the blocks
      before it; 0: none (bidirectional unless causal).
    implementation, chunk_size: see `attention`.
    decode_chunk_size: decoding with a cache reads its filled part in chunks
      of this many slots (`cached_attention`).
  """

  def __init__(self, embed_dim: int, num_heads: int, *, dtype: jnp.dtype,
               rngs: nnx.Rngs, causal: bool = False, block_size: int = 0,
               implementation: str = "xla", chunk_size: int = 64,
               decode_chunk_size: int = 32):
    head_dim = embed_dim // num_heads
    qkv_shape = (embed_dim, num_heads, head_dim)
    qkv_names = ("embed", "heads", "head_dim")
    qkv_init = fan_in_init(in_axis=0, out_axis=(1, 2))
    self.query = logical_param(rngs, qkv_init, qkv_shape, qkv_names)
    self.key = logical_param(rngs, qkv_init, qkv_shape, qkv_names)
    self.value = logical_param(rngs, qkv_init, qkv_shape, qkv_names)
    self.out = logical_param(
        rngs, fan_in_init(in_axis=(0, 1), out_axis=2),
        (num_heads, head_dim, embed_dim), ("heads", "head_dim", "embed"))
    self.dtype = dtype
    self.causal = causal
    self.block_size = block_size
    self.implementation = implementation
    self.chunk_size = chunk_size
    self.decode_chunk_size = decode_chunk_size

  def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array,
               mask_BLL: jax.Array | None = None) -> jax.Array:
    """Outputs float[B, L, D]; mask_BLL (bool[B or 1, L or 1, L]) replaces
    the block-causal mask of a block model (e.g. `block_diffusion_mask`, or
    it restricted to a row's visible keys) and is combined with `causal`."""
    q_BLHK, k_BLHK, v_BLHK = self._project(x_BLD, positions_BL)
    if mask_BLL is None and self.block_size:
      length = x_BLD.shape[1]
      mask_BLL = block_causal_mask(0, length, length, self.block_size)
    out_BLHK = attention(q_BLHK, k_BLHK, v_BLHK, causal=self.causal,
                         mask_BTS=mask_BLL, implementation=self.implementation,
                         chunk_size=self.chunk_size)
    return self._output(out_BLHK)

  def decode(self, x_BTD: jax.Array, start: jax.Array | int,
             cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Attention of T new tokens at positions [start, start + T) over a cache.

    Their keys and values are written into the cache, then each query attends
    to the cached positions it sees (`cached_attention`): up to its own
    (causal), up to the end of its block (block-causal), or all of the cache
    (bidirectional). Equals `__call__` on the whole sequence when the cache
    holds the other positions a query sees: for causal and block models the
    first `start` positions, with [start, start + T) whole blocks.

    Args:
      x_BTD: float[B, T, D] inputs of the new tokens.
      start: int32 scalar (may be traced), absolute position of the first one.
      cache: this layer's keys and values of the other positions.

    Returns:
      (float[B, T, D] outputs, the cache with the new positions written).
    """
    batch, num_tokens = x_BTD.shape[:2]
    positions_BT = jnp.broadcast_to(start + jnp.arange(num_tokens),
                                    (batch, num_tokens))
    q_BTHK, k_BTHK, v_BTHK = self._project(x_BTD, positions_BT)
    cache = cache.write(k_BTHK, v_BTHK, start)
    visible_block = 1 if self.causal else self.block_size or cache.max_len
    out_BTHK = cached_attention(q_BTHK, cache, start, self.decode_chunk_size,
                                visible_block)
    return self._output(out_BTHK), cache

  def _project(self, x_BLD, positions_BL):
    """Queries and keys (rotated at their positions), values: [B, L, H, K].

    Three matmuls: one over the stacked kernels costs more on CPU (measured), since the stack and
    the gradient's reassembly from the three slices are copies of their own."""
    x_BLD = x_BLD.astype(self.dtype)
    q_BLHK, k_BLHK, v_BLHK = (dense(x_BLD, param[...].astype(self.dtype))
                              for param in (self.query, self.key, self.value))
    return apply_rope(q_BLHK, positions_BL), apply_rope(k_BLHK, positions_BL), v_BLHK

  def _output(self, out_BLHK):
    return dense(out_BLHK, self.out[...].astype(self.dtype), contracting=2)


class Mlp(nnx.Module):
  """Two-layer GELU MLP without biases."""

  def __init__(self, embed_dim: int, mlp_dim: int, *, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.wi = logical_param(rngs, fan_in_init(0, 1), (embed_dim, mlp_dim),
                            ("embed", "mlp"))
    self.wo = logical_param(rngs, fan_in_init(0, 1), (mlp_dim, embed_dim),
                            ("mlp", "embed"))
    self.dtype = dtype

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    cast = lambda param: param[...].astype(self.dtype)
    return dense(jax.nn.gelu(dense(x_BLD.astype(self.dtype), cast(self.wi))), cast(self.wo))


def sinusoidal_embedding(t_B: jax.Array, dim: int,
                         max_period: float = 1e4) -> jax.Array:
  """float32[B, dim] features [cos(1000 t f_j), sin(1000 t f_j)] of t.

  Frequencies f_j = max_period^(-j / (dim/2)); t is scaled by 1000 so that
  the noise levels of a training run are resolved by the fast frequencies.
  """
  half = dim // 2
  freqs_J = jnp.exp(-math.log(max_period) * jnp.arange(half) / half)
  args_BJ = 1000.0 * t_B.astype(jnp.float32)[:, None] * freqs_J
  return jnp.concatenate([jnp.cos(args_BJ), jnp.sin(args_BJ)], axis=-1)


class TimeEmbedding(nnx.Module):
  """Noise level t[B] -> conditioning vector c[B, C]: sinusoids, then an MLP."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    zeros, dense = nnx.initializers.zeros, fan_in_init(0, 1)
    self.w1 = logical_param(rngs, dense, (dim, dim), ("cond", "cond"))
    self.b1 = logical_param(rngs, zeros, (dim,), ("cond",))
    self.w2 = logical_param(rngs, dense, (dim, dim), ("cond", "cond"))
    self.b2 = logical_param(rngs, zeros, (dim,), ("cond",))
    self.dim = dim

  def __call__(self, t_B: jax.Array) -> jax.Array:
    h_BC = sinusoidal_embedding(t_B, self.dim) @ self.w1[...] + self.b1[...]
    return jax.nn.silu(h_BC) @ self.w2[...] + self.b2[...]


class Modulation(nnx.Module):
  """adaLN: N vectors of size D from silu(c); zero-initialised, so inert."""

  def __init__(self, cond_dim: int, num: int, embed_dim: int, *,
               rngs: nnx.Rngs):
    zeros = nnx.initializers.zeros
    self.kernel = logical_param(rngs, zeros, (cond_dim, num, embed_dim),
                                ("cond", None, "embed"))
    self.bias = logical_param(rngs, zeros, (num, embed_dim), (None, "embed"))

  def __call__(self, c_BC: jax.Array) -> list[jax.Array]:
    """Returns N arrays float32[B, D]."""
    m_BND = jnp.einsum("BC,CND->BND", jax.nn.silu(c_BC), self.kernel[...])
    m_BND = m_BND + self.bias[...]
    return [m_BND[:, i] for i in range(m_BND.shape[1])]


def modulate(x_BLD: jax.Array, shift_BD: jax.Array,
             scale_BD: jax.Array) -> jax.Array:
  """x * (1 + scale) + shift, broadcast over the length axis."""
  out = x_BLD * (1.0 + scale_BD[:, None]) + shift_BD[:, None]
  return out.astype(x_BLD.dtype)
