"""Block-by-block decoding over a KV cache: exact for block diffusion, Fast-dLLM's approximate caches
for bidirectional masked models.

The canvas int32[B, L] is decoded one window of `block_size` positions at a time, left to right
(L a multiple of block_size), in one `lax.while_loop` over windows that stops as soon as every row
is done: a row is done once a finished window holds its [EOS] (with `eos_id`) or it has no masked
position left, so short answers cost little. (A done row rides along with the batch's later windows;
what they draw there becomes [PAD].) Within a window, steps reveal its masked free
positions by a rule (`BlockwiseConfig.rule`) until none is left. Fixed positions (prompts of any
length per row, [PAD] past a row's `max_new_tokens`) never change. After each window, `on_window`
(if given) hands the canvas to the host: streaming and progress bars.

Caches (`BlockwiseConfig.cache`), for a network given as `Network` (full forward and cached step):
  'exact'   block-diffusion networks (`TransformerConfig.block_size` = the window): a step runs the
            window over the cache of the finished blocks. The first step of a window also feeds the
            previous, finished window, whose clean keys and values it appends to the cache (BD3-LM
            runs a finished block once clean; here that pass is shared with the next block's first
            step). The logits equal full recomputation.
  'none'    every step runs the network on the whole canvas (the reference; for a bidirectional
            model, LLaDA's semi-autoregressive sampler).
  'prefix'  bidirectional models (Fast-dLLM's prefix cache): a window's first step runs the whole
            canvas and fills the cache; its later steps run the window and everything after it over
            the cached prefix. Compiles one step per window position (static shapes).
  'dual'    bidirectional models (Fast-dLLM's dual cache): as 'prefix', but later steps run only
            the window, over the cached prefix and suffix.
The 'prefix' and 'dual' caches are approximate: keys and values outside the window are those of
the window's first step, refreshed at the next window.

Rules (`BlockwiseConfig.rule`) of a window of n masked free positions and S = steps_per_block:
  'ancestral'       the masked process's exact step over the window's time grid t_i = 1 - i / S
                    (each masked position revealed with probability (alpha_s - alpha_t) /
                    (1 - alpha_t)); exact for block diffusion with the 'exact' cache.
  'random'          n spread evenly over the S steps, at random positions.
  'low_confidence'  n spread evenly over the S steps, where the drawn token is most probable.
The parallel rules reveal as many positions per step as their test allows, at least one, so a
window takes between 1 and block_size steps (steps_per_block is not read). A position's confidence
c is the network's probability p(x_0 | x_t) of its drawn token (before temperature, top-k and
top-p; at temperature 0 the largest probability), its entropy H that of p(x_0 | x_t):
  'threshold'       Fast-dLLM's threshold rule: every position with c >= `threshold`, and the most
                    confident one when none is.
  'factor'          Fast-dLLM's factor rule: with the confidences sorted, c_(1) >= c_(2) >= ..., the
                    n most confident for the largest n with (n + 1) * (1 - c_(n)) < `factor`.
  'entropy_bound'   the EB-sampler (Ben-Hamu et al. 2025), with entropy as its error proxy: with
                    the positions sorted by entropy, lowest first, the largest prefix U with
                    sum_{l in U} H_l - max_{l in U} H_l <= `entropy_bound`.
These change the output distribution (as 'low_confidence' does): they trade quality for steps.

The network reads noise level t = the share of the row's free positions still masked (ignored by
networks without time conditioning, such as block networks). Randomness is per row: row r at
window w and step i uses fold_in(fold_in(fold_in(key, row_ids[r]), w), i).
"""
import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from ddlm_jax import samplers
from ddlm_jax.processes import base
from ddlm_jax.processes import block as block_lib
from ddlm_jax.processes import masked

RULES = ("ancestral", "random", "low_confidence", "threshold", "factor", "entropy_bound")
PARALLEL_RULES = ("threshold", "factor", "entropy_bound")
CACHES = ("exact", "none", "prefix", "dual")


@dataclasses.dataclass(frozen=True)
class BlockwiseConfig:
  """Settings of block-by-block decoding (static under jit).

  Attributes:
    block_size: positions per window; a block-diffusion model's own block size.
    steps_per_block: S, the steps of a window ('ancestral', 'random', 'low_confidence'; the
      parallel rules take as many as they need, at most block_size).
    rule: one of RULES.
    cache: one of CACHES.
    temperature, top_k, top_p: the token draw (`base.TokenDraw`).
    threshold: tau in [0, 1] of rule 'threshold' (1: one position per step, 0: the whole window).
    factor: f > 0 of rule 'factor' (f <= 2 (1 - c_(1)): one position per step).
    entropy_bound: gamma >= 0 (nats) of rule 'entropy_bound' (0: one position per step unless
      some have zero entropy).
  """
  block_size: int
  steps_per_block: int = 4
  rule: str = "low_confidence"
  cache: str = "exact"
  temperature: float = 1.0
  top_k: int | None = None
  top_p: float = 1.0
  threshold: float = 0.9
  factor: float = 1.0
  entropy_bound: float = 0.1

  def __post_init__(self):
    if self.block_size < 1:
      raise ValueError(f"block_size must be >= 1, got {self.block_size}")
    if self.steps_per_block < 1:
      raise ValueError(f"steps_per_block must be >= 1, got {self.steps_per_block}")
    if self.rule not in RULES:
      raise ValueError(f"decoding rule {self.rule!r} is not one of {RULES}")
    if self.cache not in CACHES:
      raise ValueError(f"decoding cache {self.cache!r} is not one of {CACHES}")
    if not 0.0 <= self.threshold <= 1.0:
      raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")
    if not self.factor > 0:
      raise ValueError(f"factor must be > 0, got {self.factor}")
    if not self.entropy_bound >= 0:
      raise ValueError(f"entropy_bound must be >= 0, got {self.entropy_bound}")
    self.draw  # validates temperature, top_k and top_p

  @property
  def draw(self) -> base.TokenDraw:
    return base.TokenDraw(self.temperature, self.top_k, self.top_p)

  @property
  def max_steps(self) -> int:
    """The most steps a window takes: a parallel rule reveals at least one position per step."""
    return self.block_size if self.rule in PARALLEL_RULES else self.steps_per_block


@dataclasses.dataclass(frozen=True)
class Network:
  """A token network as the decoder calls it.

  Attributes:
    model_fn: the full forward (tokens int32[B, L], t float32[B]) -> logits float32[B, L, W].
    step_fn: the cached step (tokens int32[B, T], start, cache, t float32[B] or None) -> (logits
      float32[B, T, W], cache) over T tokens at positions [start, start + T), e.g. from
      `transformer.make_decoder`; None for cache 'none'.
    cache: step_fn's empty cache of exactly L positions, the canvas (a bidirectional model's
      queries read all of it); None for cache 'none'.
  """
  model_fn: Callable
  step_fn: Callable | None = None
  cache: Any = None


@flax.struct.dataclass
class _Loop:
  """The state of the loop over windows."""
  canvas_BL: jax.Array
  cache: Any
  window: jax.Array
  done_B: jax.Array
  network_calls: jax.Array


def check_blockwise(process, config: BlockwiseConfig, length: int) -> None:
  """Raises ValueError for settings the process or the canvas cannot take."""
  name = type(process).__name__
  if not isinstance(process, (masked.MaskedDiffusion, block_lib.BlockDiffusion)):
    raise ValueError(f"block-by-block decoding reveals [MASK]ed positions: it needs process 'masked' or "
                     f"'block', not {name}")
  is_block = isinstance(process, block_lib.BlockDiffusion)
  if is_block and config.block_size != process.block_size:
    raise ValueError(f"a block-diffusion model decodes its own blocks: block_size must be "
                     f"{process.block_size}, got {config.block_size}")
  if config.cache == "exact" and not is_block:
    raise ValueError("cache 'exact' needs a block-diffusion model; a bidirectional masked model takes "
                     "'none', 'prefix' or 'dual' (Fast-dLLM's approximate caches)")
  if config.cache in ("prefix", "dual") and is_block:
    raise ValueError(f"cache {config.cache!r} approximates a bidirectional model; a block-diffusion model's "
                     "cache is 'exact'")
  if length % config.block_size:
    raise ValueError(f"the canvas length {length} must be a multiple of block_size {config.block_size}")


def most_confident(scores_BT: jax.Array, active_BT: jax.Array, count_B: jax.Array) -> jax.Array:
  """bool[B, T]: the count_B[b] active positions of row b with the highest scores (all of them if
  fewer; ties broken by position)."""
  return active_BT & samplers.top_k_mask(jnp.where(active_BT, scores_BT, -jnp.inf), count_B)


def threshold_reveal(confidence_BT: jax.Array, active_BT: jax.Array, threshold: float) -> jax.Array:
  """bool[B, T]: rule 'threshold', the active positions with confidence >= threshold, and the most
  confident active one of a row where none is."""
  return (active_BT & (confidence_BT >= threshold)) | most_confident(confidence_BT, active_BT,
                                                                     jnp.ones(active_BT.shape[:1], jnp.int32))


def factor_reveal(confidence_BT: jax.Array, active_BT: jax.Array, factor: float) -> jax.Array:
  """bool[B, T]: rule 'factor' (Fast-dLLM, Wu et al. 2025, the factor-based parallel decoding that
  its parallel-decoding theorem motivates): the n most confident active positions of a row, n the
  largest with (n + 1) * (1 - c_(n)) < factor for the row's active confidences sorted
  c_(1) >= c_(2) >= ..., and at least one."""
  sorted_BT = -jnp.sort(-jnp.where(active_BT, confidence_BT, -jnp.inf), axis=1)  # inactive last, at -inf
  n_T = jnp.arange(1, active_BT.shape[1] + 1)
  fits_BT = (n_T + 1) * (1.0 - sorted_BT) < factor  # False where -inf
  count_B = jnp.maximum(jnp.max(jnp.where(fits_BT, n_T, 0), axis=1), 1)
  return most_confident(confidence_BT, active_BT, count_B)


def entropy_bound_reveal(entropy_BT: jax.Array, active_BT: jax.Array, bound: float) -> jax.Array:
  """bool[B, T]: rule 'entropy_bound' (the EB-sampler, Ben-Hamu et al. 2025, entropy as the error
  proxy): the row's active positions sorted by entropy, lowest first, and the largest prefix U with
  sum_{l in U} H_l - max_{l in U} H_l <= bound (at least one: a single position passes any bound)."""
  active_sorted_BT = jnp.arange(active_BT.shape[1]) < active_BT.sum(axis=1, keepdims=True)
  sorted_BT = jnp.where(active_sorted_BT, jnp.sort(jnp.where(active_BT, entropy_BT, jnp.inf), axis=1), 0.0)
  excess_BT = jnp.cumsum(sorted_BT, axis=1) - jax.lax.cummax(sorted_BT, axis=1)
  count_B = (active_sorted_BT & (excess_BT <= bound)).sum(axis=1)  # a prefix: the excess never decreases
  return most_confident(-entropy_BT, active_BT, count_B)


def parallel_reveal(config: BlockwiseConfig, log_probs_BTV: jax.Array, candidates_BT: jax.Array,
                    active_BT: jax.Array) -> jax.Array:
  """bool[B, T]: the active positions that a parallel rule reveals, from the network's
  log p(x_0 | x_t) float32[B, T, V] (renormalised here) and the drawn tokens int32[B, T]."""
  log_probs_BTV = jax.nn.log_softmax(log_probs_BTV, axis=-1)
  if config.rule == "entropy_bound":
    entropy_BT = jax.scipy.special.entr(jnp.exp(log_probs_BTV)).sum(axis=-1)
    return entropy_bound_reveal(entropy_BT, active_BT, config.entropy_bound)
  confidence_BT = jnp.exp(base.token_log_likelihood(log_probs_BTV, candidates_BT))
  if config.rule == "threshold":
    return threshold_reveal(confidence_BT, active_BT, config.threshold)
  return factor_reveal(confidence_BT, active_BT, config.factor)


def reveal_counts(num_masked_B: jax.Array, steps: int, step: jax.Array) -> jax.Array:
  """int32[B]: how many of a window's num_masked_B positions step `step` of `steps` reveals, evenly
  spread, earlier steps taking the remainder."""
  return (num_masked_B // steps + (step < num_masked_B % steps)).astype(jnp.int32)


def decode_blocks(network: Network, process, config: BlockwiseConfig, fixed_tokens_BL: jax.Array,
                  fixed_BL: jax.Array, key: jax.Array, *, row_ids_B: jax.Array | None = None,
                  eos_id: int | None = None, pad_id: int | None = None, prefill_length: int = 0,
                  on_window: Callable[[jax.Array, jax.Array], None] | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Decodes the free positions of a canvas window by window (see the module docstring).

  Args:
    network: the network's full forward and, for a cache, its cached step and empty cache.
    process: 'masked' (bidirectional network) or 'block' (block network).
    config: decoding settings (`check_blockwise` says which fit the process).
    fixed_tokens_BL: int32[B, L], tokens at fixed positions (ignored elsewhere).
    fixed_BL: bool[B, L], positions that are never changed: each row's prompt (any length), and
      [PAD] after the row's last position to generate.
    key: PRNG key.
    row_ids_B: int32[B] identities of the rows for their randomness; defaults to 0..B-1.
    eos_id, pad_id: with both, [PAD] is never drawn before a row's [EOS], a row is done once a
      finished window holds its [EOS], and free positions after it become [PAD].
    prefill_length: cache 'exact' only: static P, a multiple of block_size; positions [0, P),
      fixed in every row, are run as one chunk before the loop.
    on_window: called on the host after each window, in order, with the number of windows done
      (int32) and the canvas int32[B, L] (positions past them still [MASK]): streaming and
      progress (`jax.debug.callback`; static, so a new function compiles anew).

  Returns:
    (tokens int32[B, L], {"network_calls": int32 scalar, "windows": int32 scalar}).
  """
  batch_size, length = fixed_BL.shape
  check_blockwise(process, config, length)
  size = config.block_size
  if prefill_length % size or not 0 <= prefill_length < length or (prefill_length and config.cache != "exact"):
    raise ValueError(f"prefill_length must be a multiple of block_size {size} below {length}, and needs cache "
                     f"'exact'; got {prefill_length} with cache {config.cache!r}")
  within = process.within_block if isinstance(process, block_lib.BlockDiffusion) else process
  mask_id, draw = within.mask_id, config.draw
  shaped = eos_id is not None and pad_id is not None
  if row_ids_B is None:
    row_ids_B = jnp.arange(batch_size)
  row_keys_B = jax.vmap(lambda row: jax.random.fold_in(key, row))(row_ids_B)
  canvas_BL = jnp.where(fixed_BL, fixed_tokens_BL, mask_id).astype(jnp.int32)
  num_free_B = jnp.maximum((~fixed_BL).sum(axis=1), 1)
  cache, network_calls = network.cache, jnp.zeros((), jnp.int32)
  if prefill_length:
    _, cache = network.step_fn(canvas_BL[:, :prefill_length], 0, cache, None)
    network_calls += 1

  def window_logits(window, cache, canvas_BL, step, first):
    """Logits float32[B, size, W] of the window, and the cache; `first` (static): the window's
    first step under the 'exact' cache."""
    start = window * size
    t_B = ((canvas_BL == mask_id) & ~fixed_BL).sum(axis=1) / num_free_B
    window_BT = jax.lax.dynamic_slice_in_dim(canvas_BL, start, size, axis=1)
    if config.cache == "none":
      return jax.lax.dynamic_slice_in_dim(network.model_fn(canvas_BL, t_B), start, size, axis=1), cache
    if config.cache == "exact":
      def with_previous(cache):  # the finished window before this one, appended clean, and this one
        fed_start = jnp.maximum(start - size, 0) if length >= 2 * size else 0
        fed_BT = jax.lax.dynamic_slice_in_dim(canvas_BL, fed_start, min(2 * size, length), axis=1)
        logits_BTW, cache = network.step_fn(fed_BT, fed_start, cache, t_B)
        return jax.lax.dynamic_slice_in_dim(logits_BTW, start - fed_start, size, axis=1), cache
      return with_previous(cache) if first else network.step_fn(window_BT, start, cache, t_B)

    def refresh(cache):  # the whole canvas, filling the cache
      logits_BLW, cache = network.step_fn(canvas_BL, 0, cache, t_B)
      return jax.lax.dynamic_slice_in_dim(logits_BLW, start, size, axis=1), cache

    if config.cache == "dual":
      later = lambda cache: network.step_fn(window_BT, start, cache, t_B)
    else:  # 'prefix': the window and everything after it, one static length per window position
      def later(cache):
        def from_window(window_start):
          logits_BTW, cache_out = network.step_fn(canvas_BL[:, window_start:], window_start, cache, t_B)
          return logits_BTW[:, :size], cache_out
        branches = [lambda w=w: from_window(w * size) for w in range(length // size)]
        return jax.lax.switch(window, branches)
    return jax.lax.cond(step == 0, refresh, later, cache)

  def reveal(window, canvas_BL, logits_BTW, step, num_masked_B):
    """The canvas after one step of the rule on the window."""
    start = window * size
    window_BT = jax.lax.dynamic_slice_in_dim(canvas_BL, start, size, axis=1)
    free_BT = ~jax.lax.dynamic_slice_in_dim(fixed_BL, start, size, axis=1)
    active_BT = (window_BT == mask_id) & free_BT
    step_keys_B = jax.vmap(lambda row_key: jax.random.fold_in(jax.random.fold_in(row_key, window), step))(
        row_keys_B)
    token_u_BT, choice_u_BT = base.step_uniforms(step_keys_B, size)
    log_probs_BTV = within.masked_log_probs(logits_BTW)
    if shaped:  # [PAD] only after the row's [EOS]
      eos_before_BT = jax.lax.dynamic_slice_in_dim(samplers.cumulative_before(canvas_BL == eos_id), start, size, axis=1)
      log_probs_BTV = log_probs_BTV.at[..., pad_id].set(jnp.where(eos_before_BT, log_probs_BTV[..., pad_id],
                                                                  -jnp.inf))
    candidates_BT = draw(log_probs_BTV, token_u_BT)
    if config.rule == "ancestral":
      steps = config.steps_per_block
      t, s = 1.0 - step / steps, 1.0 - (step + 1) / steps
      reveal_BT = active_BT & (choice_u_BT < within.unmask_prob(t, s))
    elif config.rule in PARALLEL_RULES:
      reveal_BT = parallel_reveal(config, log_probs_BTV, candidates_BT, active_BT)
    else:
      scores_BT = (choice_u_BT if config.rule == "random"
                   else base.token_log_likelihood(log_probs_BTV, candidates_BT))
      reveal_BT = most_confident(scores_BT, active_BT, reveal_counts(num_masked_B, config.steps_per_block, step))
    window_BT = jnp.where(reveal_BT, candidates_BT, window_BT)
    return jax.lax.dynamic_update_slice_in_dim(canvas_BL, window_BT, start, axis=1)

  def masked_in_window(window, canvas_BL):
    window_BT = jax.lax.dynamic_slice_in_dim(canvas_BL, window * size, size, axis=1)
    free_BT = ~jax.lax.dynamic_slice_in_dim(fixed_BL, window * size, size, axis=1)
    return ((window_BT == mask_id) & free_BT).sum(axis=1)

  def decode_window(loop):
    num_masked_B = masked_in_window(loop.window, loop.canvas_BL)

    def step_cond(carry):
      canvas_BL, _, step, _ = carry
      return jnp.any(masked_in_window(loop.window, canvas_BL) > 0) & (step < config.max_steps)

    def step_body(carry, first=False):
      canvas_BL, cache, step, calls = carry
      logits_BTW, cache = window_logits(loop.window, cache, canvas_BL, step, first)
      return reveal(loop.window, canvas_BL, logits_BTW, step, num_masked_B), cache, step + 1, calls + 1

    carry = (loop.canvas_BL, loop.cache, jnp.zeros((), jnp.int32), loop.network_calls)
    if config.cache == "exact":  # always taken, outside the loop: it appends the previous window's keys
      carry = step_body(carry, first=True)
    canvas_BL, cache, _, calls = jax.lax.while_loop(step_cond, step_body, carry)
    end = (loop.window + 1) * size
    positions_L = jnp.arange(length)
    free_masked_BL = (canvas_BL == mask_id) & ~fixed_BL
    done_B = loop.done_B | ~free_masked_BL.any(axis=1)
    if shaped:
      done_B |= ((canvas_BL == eos_id) & ~fixed_BL & (positions_L < end)).any(axis=1)
    if on_window is not None:
      jax.debug.callback(on_window, loop.window + 1, canvas_BL, ordered=True)
    return loop.replace(canvas_BL=canvas_BL, cache=cache, window=loop.window + 1, done_B=done_B,
                        network_calls=calls)

  loop = _Loop(canvas_BL=canvas_BL, cache=cache,
               window=jnp.asarray(prefill_length // size, jnp.int32),
               done_B=~((canvas_BL == mask_id) & ~fixed_BL).any(axis=1), network_calls=network_calls)
  loop = jax.lax.while_loop(lambda loop: (loop.window < length // size) & ~loop.done_B.all(), decode_window, loop)
  tokens_BL = loop.canvas_BL
  if shaped:
    tokens_BL = samplers.pad_after_eos(tokens_BL, fixed_BL, eos_id, pad_id)
  return tokens_BL, {"network_calls": loop.network_calls, "windows": loop.window - prefill_length // size}
