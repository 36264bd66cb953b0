"""Pre-norm transformer: the bidirectional denoiser, the (causal) AR baseline, or
the block-causal denoiser of block diffusion.

It reads token ids and returns logits, or, with `latent_dim > 0` (the Gaussian family), reads
points of a learned token-embedding space and predicts clean points there: z_t float[B, L, E] ->
z0_hat float32[B, L, E] through an input projection E -> D and an output projection D -> E, with
the word-embedding table E(w) (`embedding`, [V, E]) that the process diffuses.

Positions enter only through RoPE on queries and keys, so any length up to
`max_len` runs on the same parameters. With `time_conditioning` the noise
level t shifts and scales every norm's output adaLN-style (zero-initialised,
so an untrained model ignores t). For placement on a mesh see
`ddlm_jax.sharding.create_sharded_model`.

A block model (`block_size` > 0) sees its own block and the blocks before it.
Trained on the noised and the clean copy of a sequence side by side
(`clean_tokens_BL`), each noised token sees its own noised block and the clean
blocks before it, so one pass scores every block (BD3-LM).

A token model also runs over a KV cache (`Transformer.decode`): T tokens at
positions [start, start + T) attend to the cached keys of the positions they
see. For a causal model this is incremental decoding,

  cache, step_fn = make_decoder(graphdef, params, batch_size, max_len)
  logits_BTV, cache = step_fn(tokens_BT, start, cache)

(T > 1: a prefill chunk, T = 1: one decoding step), and for a block model the
denoising of one block over the cache of the finished blocks: both equal the
full forward. A bidirectional model reads the whole cache, stale entries
included (the approximate caches of `ddlm_jax.decoding.blockwise`). The cache
is a pytree of arrays, so all work under `jax.jit` and inside `lax.scan`.
"""
import dataclasses
from typing import Callable

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
    block_size: > 0: block-causal attention over blocks of this many
      positions (block diffusion); 0: none.
    time_conditioning: condition every block on t in [0, 1]; else t is ignored.
    dropout_rate: dropout on the residual branches, applied only when a
      `dropout_key` is passed to the model.
    remat: recompute each block's activations in the backward pass.
    dtype: compute dtype, 'float32' or 'bfloat16'; parameters stay float32
      and logits are float32.
    latent_dim: E; 0: token ids in, logits out; > 0: points of the
      E-dimensional token-embedding space in, predicted clean points out.
    attention: implementation of `layers.attention`, one of
      layers.ATTENTION_IMPLEMENTATIONS ('cudnn' needs a GPU and bfloat16).
    attention_chunk_size: query block of 'chunked' attention.
    decode_chunk_size: cache slots read per loop step when decoding
      (`layers.cached_attention`).
    shift_start_id: None, or the id of a start token: the network then keeps
      an autoregressive network's next-token convention (`next_token_shift`;
      `block_next_token_shift` for a block model), so that an AR model's
      parameters adapt to diffusion; a token model that is not causal, and
      without KV-cache decoding.
  """
  vocab_size: int
  max_len: int
  num_layers: int = 2
  num_heads: int = 4
  embed_dim: int = 128
  mlp_dim: int = 512
  causal: bool = False
  block_size: int = 0
  time_conditioning: bool = False
  dropout_rate: float = 0.0
  remat: bool = False
  dtype: str = "float32"
  latent_dim: int = 0
  attention: str = "chunked"
  attention_chunk_size: int = 64
  decode_chunk_size: int = 32
  shift_start_id: int | None = None

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
    if self.latent_dim < 0:
      raise ValueError(f"latent_dim must be >= 0, got {self.latent_dim}")
    if self.attention not in layers.ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention must be one of "
                       f"{layers.ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}")
    if self.attention == "cudnn" and self.dtype != "bfloat16":
      raise ValueError("attention='cudnn' (cuDNN flash attention) needs "
                       "dtype='bfloat16'")
    for name in ("attention_chunk_size", "decode_chunk_size"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.block_size < 0:
      raise ValueError(f"block_size must be >= 0, got {self.block_size}")
    if self.block_size and (self.causal or self.latent_dim):
      raise ValueError("block_size > 0 (block-causal attention) needs a "
                       "bidirectional token model, not causal=True or "
                       "latent_dim > 0")
    if self.latent_dim and self.causal:
      raise ValueError("latent_dim > 0 (embedding-space inputs) needs a "
                       "bidirectional model, not causal=True")
    if self.shift_start_id is not None and (self.causal or self.latent_dim):
      raise ValueError("shift_start_id (shifted outputs) needs a token model "
                       "that is not causal, not causal=True or latent_dim > 0")
    if self.shift_start_id is not None and not (
        0 <= self.shift_start_id < self.vocab_size):
      raise ValueError(f"shift_start_id {self.shift_start_id} is outside the "
                       f"vocabulary of size {self.vocab_size}")

  @property
  def output_dim(self) -> int:
    """V logits, or E coordinates of the predicted clean point."""
    return self.latent_dim or self.vocab_size

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads


class Block(nnx.Module):
  """x + Attn(mod(norm(x))), then x + Mlp(mod(norm(x)))."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    d = config.embed_dim
    self.attn_norm = layers.RMSNorm(d, rngs=rngs)
    self.attn = layers.Attention(
        d, config.num_heads, dtype=dtype, rngs=rngs, causal=config.causal,
        block_size=config.block_size,
        implementation=config.attention,
        chunk_size=config.attention_chunk_size,
        decode_chunk_size=config.decode_chunk_size)
    self.mlp_norm = layers.RMSNorm(d, rngs=rngs)
    self.mlp = layers.Mlp(d, config.mlp_dim, dtype=dtype, rngs=rngs)
    self.modulation = (layers.Modulation(d, 4, d, rngs=rngs)
                       if config.time_conditioning else None)
    self.dropout_rate = config.dropout_rate

  def __call__(self, x_BLD, positions_BL, c_BC, dropout_key, mask_BLL=None):
    """x float[B, L, D], positions int[B, L], c float32[B, C] or None,
    dropout_key or None, mask bool[B or 1, L or 1, L] or None (`Attention`) ->
    float[B, L, D]."""
    attn_key, mlp_key = (None, None) if dropout_key is None else (
        jax.random.split(dropout_key))
    attn_mod, mlp_mod = self._modulations(c_BC)
    h_BLD = _norm_and_modulate(self.attn_norm, x_BLD, attn_mod)
    h_BLD = self.attn(h_BLD, positions_BL, mask_BLL)
    x_BLD = x_BLD + layers.dropout(h_BLD, self.dropout_rate, attn_key)
    h_BLD = self.mlp(_norm_and_modulate(self.mlp_norm, x_BLD, mlp_mod))
    return x_BLD + layers.dropout(h_BLD, self.dropout_rate, mlp_key)

  def decode(self, x_BTD, start, c_BC, cache):
    """The block on T new tokens at positions [start, start + T) over a cache
    (no dropout): x float[B, T, D], start int32 scalar, c float32[B, C] or
    None, cache layers.KVCache -> (float[B, T, D], cache)."""
    attn_mod, mlp_mod = self._modulations(c_BC)
    h_BTD = _norm_and_modulate(self.attn_norm, x_BTD, attn_mod)
    h_BTD, cache = self.attn.decode(h_BTD, start, cache)
    x_BTD = x_BTD + h_BTD
    h_BTD = self.mlp(_norm_and_modulate(self.mlp_norm, x_BTD, mlp_mod))
    return x_BTD + h_BTD, cache

  def _modulations(self, c_BC):
    """adaLN (shift, scale) of the attention and MLP branches, or Nones."""
    if self.modulation is None:
      return None, None
    shifts_and_scales = self.modulation(c_BC)
    return shifts_and_scales[:2], shifts_and_scales[2:]


def _norm_and_modulate(norm, x_BLD, shift_and_scale):
  """norm(x), then adaLN shift and scale when given (time conditioning)."""
  h_BLD = norm(x_BLD)
  return h_BLD if shift_and_scale is None else layers.modulate(
      h_BLD, *shift_and_scale)


class Transformer(nnx.Module):
  """tokens int32[B, L] (and t float32[B]) -> logits float32[B, L, V]; with
  latent_dim E > 0, z_t float[B, L, E] (and t) -> z0_hat float32[B, L, E]."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    d, v, e = config.embed_dim, config.vocab_size, config.latent_dim
    if e:
      self.embedding = layers.logical_param(
          rngs, nnx.initializers.normal(1.0), (v, e), ("vocab", None))
      self.input_projection = layers.logical_param(
          rngs, layers.fan_in_init(in_axis=0, out_axis=1), (e, d),
          (None, "embed"))
    else:
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
        rngs, layers.fan_in_init(in_axis=0, out_axis=1), (d, config.output_dim),
        ("embed", None if e else "vocab"))

  def __call__(
      self,
      tokens_BL: jax.Array,
      t_B: jax.Array | None = None,
      *,
      dropout_key: jax.Array | None = None,
      clean_tokens_BL: jax.Array | None = None,
      visible_BL: jax.Array | None = None,
      anneal: tuple[jax.Array, jax.Array] | None = None,
  ) -> jax.Array:
    """Logits (or predicted clean points) at every position.

    Args:
      tokens_BL: int32[B, L] token ids, L <= max_len; with latent_dim E > 0,
        points float[B, L, E] of the token-embedding space instead.
      t_B: float[B] (or a scalar) noise level in [0, 1]; required with
        time_conditioning, ignored without.
      dropout_key: PRNG key that switches dropout on (training); None: off.
      clean_tokens_BL: block models only: the clean sequence x_0, int32[B, L],
        run beside the noised one (`tokens_BL`) under
        `layers.block_diffusion_mask`, so that the logits of a block see the
        noised block and the clean blocks before it; None: tokens_BL alone,
        block-causal.
      visible_BL: bool[B, L], the positions each row's queries may attend to:
        keys where False are hidden from every query (of both copies with
        `clean_tokens_BL`), under every attention implementation, so a
        visible position's output does not depend on the hidden ones (e.g.
        the positions after a text shorter than the canvas). Each row's first
        position must be visible, so that every query sees a key. None: all.
      anneal: (ratio, key) of a bidirectional model's attention annealed from
        causal (AR -> diffusion adaptation): each query sees the keys up to
        its own and each later key with probability `ratio`, one draw per
        query-key pair shared by the batch (`layers.annealed_causal_mask`).
        None: the model's own attention.

    Returns:
      float32[B, L, V] logits; float32[B, L, E] with latent_dim E > 0.
    """
    if self.config.shift_start_id is not None and self.config.block_size:
      return block_next_token_shift(
          self._forward, self.config.shift_start_id, self.config.block_size)(
              tokens_BL, t_B, dropout_key=dropout_key,
              clean_tokens_BL=clean_tokens_BL, visible_BL=visible_BL,
              anneal=anneal)
    if self.config.shift_start_id is not None:
      return next_token_shift(self._forward, self.config.shift_start_id)(
          tokens_BL, t_B, dropout_key=dropout_key, visible_BL=visible_BL,
          anneal=anneal)
    return self._forward(tokens_BL, t_B, dropout_key=dropout_key,
                         clean_tokens_BL=clean_tokens_BL,
                         visible_BL=visible_BL, anneal=anneal)

  def _forward(self, tokens_BL, t_B=None, *, dropout_key=None,
               clean_tokens_BL=None, visible_BL=None, anneal=None):
    """`__call__` without the shift of `shift_start_id`."""
    config = self.config
    batch, length = tokens_BL.shape[:2]
    if length > config.max_len:
      raise ValueError(
          f"sequence length {length} exceeds max_len {config.max_len}")
    positions_L, mask_BLL = jnp.arange(length), None
    if visible_BL is not None and visible_BL.shape != (batch, length):
      raise ValueError(f"visible_BL has shape {visible_BL.shape}, the tokens "
                       f"{(batch, length)}")
    x_BLD = self._embed(tokens_BL)
    if clean_tokens_BL is not None:
      if not config.block_size:
        raise ValueError("clean_tokens_BL (the clean copy of a block-diffusion "
                         "pass) needs a block model (block_size > 0)")
      if clean_tokens_BL.shape != tokens_BL.shape:
        raise ValueError(f"clean_tokens_BL has shape {clean_tokens_BL.shape}, "
                         f"the noised tokens {tokens_BL.shape}")
      x_BLD = jnp.concatenate([x_BLD, self._embed(clean_tokens_BL)], axis=1)
      positions_L = jnp.concatenate([positions_L, positions_L])
      mask_BLL = layers.block_diffusion_mask(length, config.block_size)
      if visible_BL is not None:
        visible_BL = jnp.concatenate([visible_BL, visible_BL], axis=1)
    if anneal is not None and config.block_size:
      if clean_tokens_BL is None:
        raise ValueError("anneal of a block model anneals its training pass: "
                         "it needs clean_tokens_BL")
      mask_BLL = layers.annealed_block_diffusion_mask(
          anneal[1], length, config.block_size, anneal[0])
    elif anneal is not None:
      if config.causal:
        raise ValueError("anneal (a causal mask annealed to bidirectional) "
                         "needs a model that is not causal")
      mask_BLL = layers.annealed_causal_mask(anneal[1], length, anneal[0])
    if visible_BL is not None:
      mask_BLL = self._visible_keys_mask(visible_BL, mask_BLL)
    positions_BL = jnp.broadcast_to(positions_L, (batch, len(positions_L)))
    c_BC = self._conditioning(t_B, batch)
    block_fn = nnx.remat(Block.__call__) if config.remat else Block.__call__
    for i, block in enumerate(self.blocks):
      key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
      x_BLD = block_fn(block, x_BLD, positions_BL, c_BC, key, mask_BLL)
    return self._logits(x_BLD[:, :length], c_BC)

  def init_cache(self, batch_size: int,
                 max_len: int | None = None) -> tuple[layers.KVCache, ...]:
    """An empty KV cache: one `layers.KVCache` of zeros [B, H, S, K] per block.

    Args:
      batch_size: B.
      max_len: S, positions the cache holds (default and maximum: the
        config's max_len); for a bidirectional model, the canvas length (its
        queries see the whole cache).
    """
    config = self._check_tokens()
    max_len = config.max_len if max_len is None else max_len
    if not 1 <= max_len <= config.max_len:
      raise ValueError(
          f"cache max_len must lie in [1, {config.max_len}], got {max_len}")
    return tuple(
        layers.KVCache.zeros(batch_size, max_len, config.num_heads,
                             config.head_dim, jnp.dtype(config.dtype))
        for _ in self.blocks)

  def decode(
      self,
      tokens_BT: jax.Array,
      start: jax.Array | int,
      cache: tuple[layers.KVCache, ...],
      t_B: jax.Array | None = None,
  ) -> tuple[jax.Array, tuple[layers.KVCache, ...]]:
    """Logits of T tokens at positions [start, start + T), written into the cache.

    Causal and block models: with the cache holding positions [0, start) of a
    sequence, the logits equal those of `__call__` on the sequence at these
    positions (a block model's [start, start + T) must be whole blocks). A
    bidirectional model's tokens see the whole cache, the other positions of
    its canvas as they were last written.

    Args:
      tokens_BT: int32[B, T] the next T tokens (T > 1: a prefill chunk).
      start: int32 scalar, may be traced; start + T must not exceed the
        cache's length (checked only for a Python int: a traced start that
        runs past the end is clamped).
      cache: from `init_cache` or a previous `decode`.
      t_B: noise level as in `__call__`.

    Returns:
      (float32[B, T, V] logits, the cache with positions [start, start + T)).
    """
    self._check_tokens()
    batch, num_tokens = tokens_BT.shape
    max_len = cache[0].max_len
    end = num_tokens + (start if isinstance(start, int) else 0)
    if end > max_len:
      raise ValueError(f"positions up to {end} do not fit a cache of {max_len}")
    x_BTD = self._embed(tokens_BT)
    c_BC = self._conditioning(t_B, batch)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      x_BTD, layer_cache = block.decode(x_BTD, start, c_BC, layer_cache)
      new_cache.append(layer_cache)
    return self._logits(x_BTD, c_BC), tuple(new_cache)

  def _visible_keys_mask(self, visible_BS, mask_BLS):
    """bool[B, L or 1, S]: `mask_BLS` (a block model's block-causal mask if
    None) restricted to the keys visible in each row."""
    keys_B1S = visible_BS.astype(bool)[:, None, :]
    if mask_BLS is None and self.config.block_size:
      length = visible_BS.shape[1]
      mask_BLS = layers.block_causal_mask(0, length, length, self.config.block_size)
    return keys_B1S if mask_BLS is None else mask_BLS & keys_B1S

  def _check_tokens(self) -> TransformerConfig:
    if self.config.latent_dim:
      raise ValueError("KV-cache decoding needs a token model, not one over "
                       "embeddings (latent_dim > 0)")
    if self.config.shift_start_id is not None:
      raise ValueError("a network with shifted outputs (shift_start_id) has "
                       "no KV-cache decoding; decode it without a cache")
    return self.config

  def _embed(self, tokens_BL):
    dtype = jnp.dtype(self.config.dtype)
    if self.config.latent_dim:
      return layers.dense(tokens_BL.astype(dtype), self.input_projection[...].astype(dtype))
    return jnp.take(self.embedding[...], tokens_BL, axis=0).astype(dtype)

  def _conditioning(self, t_B, batch):
    """c float32[B, C] from the noise level; None without time conditioning."""
    if self.time_embedding is None:
      return None
    if t_B is None:
      raise ValueError("time_conditioning=True needs the noise level t_B")
    return self.time_embedding(jnp.broadcast_to(t_B, (batch,)))

  def _logits(self, x_BLD, c_BC):
    dtype = jnp.dtype(self.config.dtype)
    final_mod = (None if self.final_modulation is None
                 else self.final_modulation(c_BC))
    x_BLD = _norm_and_modulate(self.final_norm, x_BLD, final_mod)
    return layers.dense(x_BLD, self.unembedding[...].astype(dtype),
                        preferred_element_type=jnp.float32)


StepFn = Callable[..., tuple[jax.Array, tuple[layers.KVCache, ...]]]


def next_token_shift(network_fn: Callable, start_id: int) -> Callable:
  """The model function of a network that keeps an autoregressive network's
  next-token convention (DiffuLLaMA's shifted logits).

  An AR network reads [BOS, x^0, ..., x^{L-2}] and its output at slot i
  predicts x^i, the token after the slot's input. The shifted function reads
  tokens_BL = x_t, runs `network_fn` on [start_id, x_t^0, ..., x_t^{L-1}]
  (L + 1 slots, the same positions as the AR network's inputs) and returns
  the outputs of slots 0..L-1: position i's output comes from the slot that
  holds the token before it, as in pretraining, while (bidirectional)
  attention still sees every token of x_t.

  network_fn(tokens, t_B, *, visible_BL=None, **inputs) -> outputs[B, S, ...];
  the returned function takes the same arguments for L positions, a
  visible_BL included (the start slot is always visible).
  """
  def shifted(tokens_BL, t_B=None, *, visible_BL=None, **inputs):
    batch = tokens_BL.shape[0]
    start_B1 = jnp.full((batch, 1), start_id, tokens_BL.dtype)
    if visible_BL is not None:
      visible_BL = jnp.concatenate(
          [jnp.ones((batch, 1), bool), visible_BL.astype(bool)], axis=1)
    outputs = network_fn(jnp.concatenate([start_B1, tokens_BL], axis=1), t_B,
                         visible_BL=visible_BL, **inputs)
    return outputs[:, :-1]
  return shifted


def block_next_token_shift(network_fn: Callable, start_id: int,
                           block_size: int) -> Callable:
  """`next_token_shift` for a block network (AR -> block diffusion adaptation).

  Slot i reads the token before position i and predicts x^i: the L slots are
  [start_id, x^0, ..., x^{L-2}], so slots and positions share their blocks.
  The first slot of a block reads the clean token before the block (the last
  of the previous block, clean in training's copy of x_0 and finished when
  sampling), so a block's predictions see the clean blocks before it and the
  noised tokens of its own block but its last one, which no slot of the block
  reads. In the training pass the clean copy is shifted the same way; a
  single canvas (sampling, cache 'none') is shifted as it is.

  network_fn(tokens, t_B, *, clean_tokens_BL=None, visible_BL=None, **inputs)
  -> outputs[B, L, ...]; the returned function takes the same arguments.
  """
  def shift_in(tokens_BL, start):
    start_B1 = jnp.full((tokens_BL.shape[0], 1), start, tokens_BL.dtype)
    return jnp.concatenate([start_B1, tokens_BL[:, :-1]], axis=1)

  def shifted(tokens_BL, t_B=None, *, clean_tokens_BL=None, visible_BL=None,
              **inputs):
    slots_BL = shift_in(tokens_BL, start_id)
    if clean_tokens_BL is not None:
      clean_slots_BL = shift_in(clean_tokens_BL, start_id)
      block_start_L = jnp.arange(tokens_BL.shape[1]) % block_size == 0
      slots_BL = jnp.where(block_start_L, clean_slots_BL, slots_BL)
      inputs["clean_tokens_BL"] = clean_slots_BL
    if visible_BL is not None:
      visible_BL = shift_in(visible_BL.astype(bool), True)
    return network_fn(slots_BL, t_B, visible_BL=visible_BL, **inputs)
  return shifted


def make_decoder(graphdef: nnx.GraphDef, params: nnx.State, batch_size: int,
                 max_len: int) -> tuple[tuple[layers.KVCache, ...], StepFn]:
  """An empty cache and the pure step function of a token network.

  step_fn(tokens_BT, start, cache, t_B=None) -> (logits_BTV, cache) runs
  `Transformer.decode`, at noise level t = 0 unless t_B is given (the AR
  convention, and the value that a network without time conditioning
  ignores). Call it inside `jax.jit` with `params` as an argument.

  Args:
    graphdef, params: the network (`nnx.merge(graphdef, params)`).
    batch_size: rows decoded together.
    max_len: positions the cache holds (the decoded length; a bidirectional
      model's canvas).
  """
  model = nnx.merge(graphdef, params)

  def step_fn(tokens_BT, start, cache, t_B=None):
    if t_B is None:
      t_B = jnp.zeros((tokens_BT.shape[0],), jnp.float32)
    return model.decode(tokens_BT, start, cache, t_B)

  return model.init_cache(batch_size, max_len), step_fn


def num_params(config: TransformerConfig) -> int:
  """Number of scalar parameters of `Transformer(config)`."""
  d, v, f = config.embed_dim, config.vocab_size, config.mlp_dim
  per_block = 4 * d * d + 2 * d * f + 2 * d  # q, k, v, out; mlp; two norms
  e = config.latent_dim
  input_output = (v * e + 2 * e * d) if e else 2 * v * d
  total = input_output + d + config.num_layers * per_block
  if config.time_conditioning:
    modulation = lambda num: d * num * d + num * d
    total += 2 * (d * d + d)  # time-embedding MLP
    total += config.num_layers * modulation(4) + modulation(2)
  return total


def flops_per_token(config: TransformerConfig, seq_len: int, vocab_size: int | None = None) -> float:
  """Training FLOPs per token (forward + backward), PaLM-appendix style.

  6 * N + 12 * num_layers * embed_dim * seq_len, where
  N = num_layers * (4 D^2 + 2 D F) + D V (+ 2 D E - D V with latent_dim E)
  counts the weights of the per-token matmuls (attention projections, MLP,
  input and output projections); the embedding lookup, norms and the
  per-sequence time conditioning are left out. The second term is the q.k and
  probs.v matmuls over the full L x L score matrix (also for a causal model,
  as PaLM counts it).

  Args:
    config: the network.
    seq_len: L.
    vocab_size: the real vocabulary V counted in the output projection; the
      ids the network's vocabulary is padded with are not useful work
      (default: all config.vocab_size ids).
  """
  d, f = config.embed_dim, config.mlp_dim
  output_dim = config.latent_dim or (config.vocab_size if vocab_size is None else vocab_size)
  matmul_params = (config.num_layers * (4 * d * d + 2 * d * f)
                   + d * output_dim
                   + d * config.latent_dim)  # the input projection
  return float(6 * matmul_params + 12 * config.num_layers * d * seq_len)
