"""The contract every process follows, as Protocols, and the pieces the processes share.

A process is a frozen dataclass (hashable, static under `jax.jit`) whose methods are pure functions
of arrays and keys; they take the network as `model_fn(x_t_BL, t_B) -> logits_BLW` (an
`EmbeddingModel` for the Gaussian family), never a network module.

  `Process`            every family, the autoregressive baseline included: `nelbo` and `loss`.
  `DiffusionProcess`   a process with a reverse process, which `samplers.sample` runs as one scan:
                       `initial_state`, then `reverse_step` once per step on the network's output at
                       `state.network_input`, then `tokens`. Its state is a pytree (`ReverseState`)
                       that holds the fixed positions itself.
  `TokenProcess`       a diffusion process over token canvases (masked, uniform, D3PM): its state is
                       a `Canvas` and the network emits logits.
  `AbsorbingProcess`   a token process with a [MASK] state (`absorbing` is True): what the k-reveal
                       sampler strategies need, which unmask positions from `denoiser_log_probs`.
  `EmbeddingProcess`   the Gaussian family: its state is a point of the embedding space, the network
                       an `EmbeddingModel` that predicts the clean embedding, and its step can take
                       classifier guidance.

Time runs over [0, 1] for every family (t = 1 is pure noise); discrete-time processes map it to
their step grid. The network may emit W >= V logits (a vocabulary padded for sharding); processes
drop ids >= V.
"""
import dataclasses
from typing import Any, Callable, ClassVar, Protocol

import flax.struct
import jax
import jax.numpy as jnp

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
MIN_TIME = 1e-6


@flax.struct.dataclass
class Nelbo:
  """A one-sample estimate of the negative ELBO (or the exact NLL), per sequence.

  Attributes:
    nats_B: bound of each sequence in nats (float32[B]).
    num_tokens_B: number of scored (non-prompt) positions of each sequence (float32[B]).
  """
  nats_B: jax.Array
  num_tokens_B: jax.Array


def sample_times(key: jax.Array, batch_size: int, antithetic: bool) -> jax.Array:
  """Times t_B in [MIN_TIME, 1], uniform marginally; stratified over the batch if antithetic.

  Antithetic: one low-discrepancy grid t_b = (u + b / B) mod 1; same mean, lower variance.
  """
  if antithetic:
    offset = jax.random.uniform(key, ())
    t_B = jnp.mod(offset + jnp.arange(batch_size) / batch_size, 1.0)
  else:
    t_B = jax.random.uniform(key, (batch_size,))
  return jnp.clip(t_B, MIN_TIME, 1.0)


def scored_mask(x0_BL: jax.Array, prompt_mask_BL: jax.Array | None) -> jax.Array:
  """bool[B, L]: the positions a bound scores (all but the prompt)."""
  return jnp.ones(x0_BL.shape, bool) if prompt_mask_BL is None else ~prompt_mask_BL


def per_position_loss(estimate: Nelbo) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training loss of a NELBO estimate: nats per scored position, and its metrics."""
  nats_per_position = estimate.nats_B.sum() / jnp.maximum(estimate.num_tokens_B.sum(), 1.0)
  return nats_per_position, {"loss": nats_per_position}


def token_log_likelihood(log_probs_BLV: jax.Array, x_BL: jax.Array) -> jax.Array:
  """log p(x^l) at every position, float32[B, L]."""
  return jnp.take_along_axis(log_probs_BLV, x_BL[..., None], axis=-1)[..., 0]


def excluded_ids_bias(width: int, vocab_size: int, excluded_ids: tuple[int, ...]) -> jax.Array:
  """float32[W]: 0 on the V ids a softmax ranges over, -inf on `excluded_ids` and on the padding
  ids >= V. Adding it to logits removes those ids without a scatter into the [B, L, W] array."""
  ids_W = jnp.arange(width)
  removed_W = (ids_W >= vocab_size) | jnp.isin(ids_W, jnp.array(excluded_ids, jnp.int32))
  return jnp.where(removed_W, -jnp.inf, 0.0)


def restricted_log_softmax(logits_BLW: jax.Array, vocab_size: int,
                           excluded_ids: tuple[int, ...] = ()) -> jax.Array:
  """log softmax over the first V ids with `excluded_ids` at -inf, float32[B, L, V]."""
  bias_W = excluded_ids_bias(logits_BLW.shape[-1], vocab_size, excluded_ids)
  return jax.nn.log_softmax(logits_BLW.astype(jnp.float32) + bias_W, axis=-1)[..., :vocab_size]


@jax.custom_vjp
def _cross_entropy(logits_BLW: jax.Array, targets_BL: jax.Array, bias_W: jax.Array) -> jax.Array:
  return _cross_entropy_forward(logits_BLW, targets_BL, bias_W)[0]


def _cross_entropy_forward(logits_BLW, targets_BL, bias_W):
  # The biased logits are never stored: the backward pass adds the bias again inside its one pass.
  biased_BLW = logits_BLW.astype(jnp.float32) + bias_W
  log_normalizer_BL = jax.nn.logsumexp(biased_BLW, axis=-1)
  target_logit_BL = jnp.take_along_axis(biased_BLW, targets_BL[..., None], axis=-1)[..., 0]
  return log_normalizer_BL - target_logit_BL, (logits_BLW, bias_W, log_normalizer_BL, targets_BL)


def _cross_entropy_backward(residuals, g_BL):
  logits_BLW, bias_W, log_normalizer_BL, targets_BL = residuals
  probs_BLW = jnp.exp(logits_BLW.astype(jnp.float32) + bias_W - log_normalizer_BL[..., None])
  one_hot_BLW = jnp.arange(logits_BLW.shape[-1]) == targets_BL[..., None]
  grad_BLW = g_BL[..., None] * (probs_BLW - one_hot_BLW)
  return grad_BLW.astype(logits_BLW.dtype), None, None


_cross_entropy.defvjp(_cross_entropy_forward, _cross_entropy_backward)


def cross_entropy(logits_BLW: jax.Array, targets_BL: jax.Array, vocab_size: int,
                  excluded_ids: tuple[int, ...] = ()) -> jax.Array:
  """-log p(target) under the softmax over the first V ids with `excluded_ids` removed, float32[B, L].

  Equals `-token_log_likelihood(restricted_log_softmax(...), targets)` without the [B, L, V]
  log-probabilities: one normaliser per position and the target's logit on the way forward, and
  the gradient (softmax - one_hot) * g as one elementwise pass on the way back (no scatter).
  A target outside the softmax (an excluded id) has an infinite loss.
  """
  bias_W = excluded_ids_bias(logits_BLW.shape[-1], vocab_size, excluded_ids)
  return _cross_entropy(logits_BLW, targets_BL.astype(jnp.int32), bias_W)


@dataclasses.dataclass(frozen=True)
class TokenDraw:
  """How tokens are drawn from a predicted distribution.

  Attributes:
    temperature: softmax temperature; 0 takes the argmax.
    top_k: keep only the k most likely ids (None: all).
    top_p: nucleus sampling: keep the smallest set of most likely ids whose mass is >= top_p.
  """
  temperature: float = 1.0
  top_k: int | None = None
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k must be >= 1 (or None for no limit), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

  def filter(self, log_probs_BLV: jax.Array) -> jax.Array:
    """log-probabilities with the ids outside top-k / the nucleus set to -inf (not renormalised)."""
    if self.top_k is not None and self.top_k < log_probs_BLV.shape[-1]:
      kth_BL1 = jax.lax.top_k(log_probs_BLV, self.top_k)[0][..., -1:]
      log_probs_BLV = jnp.where(log_probs_BLV >= kth_BL1, log_probs_BLV, -jnp.inf)
    if self.top_p < 1.0:
      probs_BLV = jax.nn.softmax(log_probs_BLV, axis=-1)
      sorted_BLV = -jnp.sort(-probs_BLV, axis=-1)
      mass_before_BLV = jnp.cumsum(sorted_BLV, axis=-1) - sorted_BLV
      # The nucleus is the sorted prefix whose mass before each member is < p; its smallest
      # member's probability is the threshold (ties at the threshold are all kept).
      threshold_BL1 = jnp.min(jnp.where(mass_before_BLV < self.top_p, sorted_BLV, jnp.inf),
                              axis=-1, keepdims=True)
      log_probs_BLV = jnp.where(probs_BLV >= threshold_BL1, log_probs_BLV, -jnp.inf)
    return log_probs_BLV

  def log_probs(self, log_probs_BLV: jax.Array) -> jax.Array:
    """The normalised log-distribution that `__call__` samples from: a one-hot argmax at
    temperature 0, else the top-k / nucleus of softmax(log_probs / T)."""
    if self.temperature == 0:
      argmax_BLV = jax.nn.one_hot(argmax(log_probs_BLV), log_probs_BLV.shape[-1], dtype=bool)
      return jnp.where(argmax_BLV, 0.0, -jnp.inf)
    tempered_BLV = jax.nn.log_softmax(log_probs_BLV / self.temperature, axis=-1)
    return jax.nn.log_softmax(self.filter(tempered_BLV), axis=-1)

  def __call__(self, log_probs_BLV: jax.Array, uniforms_BL: jax.Array) -> jax.Array:
    """Tokens int32[B, L] drawn from `log_probs(log_probs_BLV)` by inverse CDF, with one uniform
    per position instead of V Gumbel draws (the argmax itself at temperature 0)."""
    if self.temperature == 0:
      return argmax(log_probs_BLV)
    if self.top_k is None and self.top_p == 1.0:  # no filter: the tempered weights need no normalising
      max_BL1 = jnp.max(log_probs_BLV, axis=-1, keepdims=True)
      return inverse_cdf_draw(jnp.exp((log_probs_BLV - max_BL1) / self.temperature), uniforms_BL)
    return inverse_cdf_draw(jnp.exp(self.log_probs(log_probs_BLV)), uniforms_BL)


def argmax(x_BLV: jax.Array, block_size: int = 128) -> jax.Array:
  """jnp.argmax over the last axis (the first of tied maxima), int32[B, L], in two levels: the
  block of `block_size` entries with the largest maximum, then the argmax within it. XLA's CPU
  argmax is a two-operand reduction about 20 times slower than a max over the same array, so the
  full-vocabulary pass is a plain max (at V = 8192: 8 ms instead of 62 ms for [16, 256, V])."""
  blocks_BLNC = _in_blocks(x_BLV, block_size, -jnp.inf)
  block_BL = jnp.argmax(blocks_BLNC.max(axis=-1), axis=-1)
  within_BLC = _block_at(blocks_BLNC, block_BL)
  return (block_BL * blocks_BLNC.shape[-1] + jnp.argmax(within_BLC, axis=-1)).astype(jnp.int32)


def _in_blocks(x_BLV: jax.Array, block_size: int, padding: float) -> jax.Array:
  """x cut into blocks along its last axis, [B, L, N, C] with C = min(block_size, V); a last block
  that runs past V is filled with `padding`."""
  *lead, width = x_BLV.shape
  block_size = min(block_size, width)
  num_blocks = -(-width // block_size)
  if num_blocks * block_size != width:
    x_BLV = jnp.pad(x_BLV, [(0, 0)] * len(lead) + [(0, num_blocks * block_size - width)],
                    constant_values=padding)
  return x_BLV.reshape(*lead, num_blocks, block_size)


def _block_at(blocks_BLNC: jax.Array, block_BL: jax.Array) -> jax.Array:
  """The block `block_BL` of each position, [B, L, C]."""
  return jnp.take_along_axis(blocks_BLNC, block_BL[..., None, None], axis=-2)[..., 0, :]


def inverse_cdf_draw(probs_BLV: jax.Array, uniforms_BL: jax.Array, block_size: int = 128) -> jax.Array:
  """One draw per position from (unnormalised, non-negative) probs_BLV, int32[B, L]: the id where
  the cumulative mass first exceeds u times the total.

  The cumulative sum runs in two levels, over the masses of blocks of `block_size` ids and then
  within the block the draw falls in: XLA's CPU cumulative sum is a log-depth scan that costs
  about 15 passes over its input, which over a whole vocabulary cost more than a forward pass.
  A draw never lands on a zero-probability id (unless every id has zero probability).
  """
  blocks_BLNC = _in_blocks(probs_BLV, block_size, 0.0)
  block_mass_BLN = blocks_BLNC.sum(axis=-1)
  block_cdf_BLN = jnp.cumsum(block_mass_BLN, axis=-1)
  target_BL = uniforms_BL * block_cdf_BLN[..., -1]
  # Where u * total rounds up to the total, the count runs past the last id with any mass.
  block_BL = jnp.minimum((block_cdf_BLN <= target_BL[..., None]).sum(axis=-1), _last_positive(block_mass_BLN))
  take = lambda x_BLN, index_BL: jnp.take_along_axis(x_BLN, index_BL[..., None], axis=-1)[..., 0]
  mass_before_BL = take(block_cdf_BLN, block_BL) - take(block_mass_BLN, block_BL)
  within_BLC = _block_at(blocks_BLNC, block_BL)
  within_cdf_BLC = mass_before_BL[..., None] + jnp.cumsum(within_BLC, axis=-1)
  offset_BL = jnp.minimum((within_cdf_BLC <= target_BL[..., None]).sum(axis=-1), _last_positive(within_BLC))
  return (block_BL * blocks_BLNC.shape[-1] + offset_BL).astype(jnp.int32)


def _last_positive(x_BLN: jax.Array) -> jax.Array:
  """Index of the last entry > 0 along the last axis (0 if none), int32[B, L]."""
  return x_BLN.shape[-1] - 1 - jnp.argmax(jnp.flip(x_BLN > 0, axis=-1), axis=-1)


def step_uniforms(step_keys_B: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
  """(token_u_BL, choice_u_BL): the two uniforms per position of a token step, row b's from
  step_keys_B[b] only (one to draw a token, one to choose whether or which positions move)."""
  uniforms_B2L = jax.vmap(lambda step_key: jax.random.uniform(step_key, (2, length)))(step_keys_B)
  return uniforms_B2L[:, 0], uniforms_B2L[:, 1]


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What a reverse step reads from the sampler settings (static under jit).

  Attributes:
    draw: how the token families draw from p(x_0 | x_t) (temperature, top-k, top-p).
    method: the Gaussian family's step: 'ddpm' (ancestral) or 'ddim'.
    eta: DDIM's noise scale (0: deterministic, 1: the DDPM step).
    clamp: the Gaussian family snaps z0_hat to the nearest embedding before the step.
  """
  draw: TokenDraw = TokenDraw()
  method: str = "ddpm"
  eta: float = 0.0
  clamp: bool = False


@flax.struct.dataclass
class Canvas:
  """The reverse-process state of a token process.

  Attributes:
    tokens_BL: x_t, int32[B, L]; fixed positions hold their tokens.
    fixed_BL: bool[B, L], the positions no step changes (prompt, constraints, padding).
  """
  tokens_BL: jax.Array
  fixed_BL: jax.Array

  @property
  def network_input(self) -> jax.Array:
    return self.tokens_BL

  def moved_to(self, tokens_BL: jax.Array) -> "Canvas":
    """This canvas with its free positions set to tokens_BL."""
    return self.replace(tokens_BL=jnp.where(self.fixed_BL, self.tokens_BL, tokens_BL).astype(jnp.int32))


class CanvasReadout:
  """`clean_input` and `tokens` of the token processes (a mixin): the state is a `Canvas`."""

  def clean_input(self, state: Canvas, token_id: int) -> int:
    """The network reads a clean token as its id."""
    del state
    return token_id

  def tokens(self, state: Canvas) -> jax.Array:
    """The canvas, int32[B, L]."""
    return state.tokens_BL


class ReverseState(Protocol):
  """A reverse process's state: a pytree (the carry of the sampler's scan)."""

  @property
  def network_input(self) -> jax.Array:
    """What the network reads: tokens int32[B, L] or points float32[B, L, D]."""


class Process(Protocol):
  """Every family, the autoregressive baseline included.

  Attributes:
    causal_network: the denoiser must use causal attention (the autoregressive baseline).
    exact_likelihood: `nelbo` is the exact NLL, not a Monte Carlo bound (one pass scores it).
  """
  causal_network: ClassVar[bool]
  exact_likelihood: ClassVar[bool]

  def nelbo(self, model_fn: Any, x0_BL: jax.Array, key: jax.Array, prompt_mask_BL: jax.Array | None = None,
            t_B: jax.Array | None = None) -> Nelbo:
    """Per-sequence negative ELBO in nats (one Monte Carlo draw; the exact NLL if exact_likelihood),
    the number every family is compared on; prompt positions are neither noised nor scored."""

  def loss(self, model_fn: Any, x0_BL: jax.Array, key: jax.Array,
           prompt_mask_BL: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training objective (a scalar) and its metrics, which include "loss"."""


class DiffusionProcess(Process, Protocol):
  """A process whose reverse process `samplers.sample` runs: `initial_state`, then per step the
  network on `state.network_input` at time t and `reverse_step` to time s < t, then `tokens`.

  Attributes:
    absorbing: the process has a [MASK] state (`AbsorbingProcess`), which the k-reveal sampler
      strategies unmask.
    continuous: the state is a point of the embedding space (`EmbeddingProcess`), not tokens.
  """
  absorbing: bool
  continuous: ClassVar[bool]

  def initial_state(self, model: Any, fixed_tokens_BL: jax.Array, fixed_BL: jax.Array,
                    row_keys_B: jax.Array) -> ReverseState:
    """A draw from the prior at t = 1 with the fixed positions in place; row b draws with
    row_keys_B[b] only (so it does not depend on its batch)."""

  def reverse_step(self, state: ReverseState, output: jax.Array, t: jax.Array, s: jax.Array,
                   step_keys_B: jax.Array, settings: StepSettings) -> ReverseState:
    """One step x_t -> x_s (s < t) given the network's output at (state.network_input, t); row b's
    randomness comes from step_keys_B[b] only; fixed positions are held."""

  def clean_input(self, state: ReverseState, token_id: int) -> jax.Array:
    """What the network reads at a position that holds token_id clean (the null condition of
    classifier-free guidance)."""

  def tokens(self, state: ReverseState) -> jax.Array:
    """The state as tokens, int32[B, L]."""


class TokenProcess(DiffusionProcess, Protocol):
  """A diffusion process over token canvases (masked, uniform, D3PM); the network emits logits."""

  def initial_state(self, model: Any, fixed_tokens_BL: jax.Array, fixed_BL: jax.Array,
                    row_keys_B: jax.Array) -> Canvas:
    """See `DiffusionProcess`; the model is not read."""

  def reverse_step(self, state: Canvas, output: jax.Array, t: jax.Array, s: jax.Array,
                   step_keys_B: jax.Array, settings: StepSettings) -> Canvas:
    """See `DiffusionProcess`; output is the logits float32[B, L, W], tokens are drawn with
    settings.draw."""

  def denoiser_log_probs(self, logits_BLW: jax.Array, xt_BL: jax.Array, t: jax.Array) -> jax.Array:
    """log p(x_0 | x_t), float32[B, L, V], from the network's logits at (x_t, t)."""


class AbsorbingProcess(TokenProcess, Protocol):
  """A token process with a [MASK] state (absorbing is True).

  Attributes:
    mask_id: id of [MASK]; a masked position stays masked until a step reveals it.
  """
  mask_id: int


class EmbeddingProcess(DiffusionProcess, Protocol):
  """The Gaussian family: the model is an `EmbeddingModel` (z_t -> z0_hat and the embedding table)."""

  def reverse_step(self, state: ReverseState, output: jax.Array, t: jax.Array, s: jax.Array,
                   step_keys_B: jax.Array, settings: StepSettings,
                   guide_fn: Callable | None = None) -> ReverseState:
    """See `DiffusionProcess`; output is z0_hat float32[B, L, D]; guide_fn (classifier guidance)
    moves the step's mean."""
