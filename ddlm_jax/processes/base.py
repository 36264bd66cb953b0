"""The contract every process follows, and the pieces they share.

A process is a frozen dataclass (hashable, static under `jax.jit`) with these methods, all pure
functions of arrays and keys that take `model_fn(x_t_BL, t_B) -> logits_BLW` and never a network:

  nelbo(model_fn, x0_BL, key, prompt_mask_BL=None) -> Nelbo
      per-sequence negative ELBO in nats (a one-sample Monte Carlo estimate; exact for the
      autoregressive baseline), the number every family is compared on.
  loss(model_fn, x0_BL, key, prompt_mask_BL=None) -> (scalar, metrics)
      the training objective; metrics include "loss".
  initial_canvas(fixed_tokens_BL, fixed_BL, key) -> int32[B, L]
      a draw from the prior at t = 1, with fixed positions already in place.
  reverse_step(canvas_BL, logits_BLW, t, s, token_u_BL, choice_u_BL, draw) -> int32[B, L]
      one ancestral step x_t -> x_s (s < t) given the network's logits at x_t, using the two
      uniforms per position it is handed and `draw` (a `TokenDraw`) for sampling from p(x_0 | x_t).

The Gaussian family (`gaussian.py`) diffuses embeddings instead of tokens: it takes a
`gaussian.EmbeddingModel` (the network's denoiser z_t -> z0_hat and its embedding table) where the
others take model_fn, and its reverse step (`step_mean_var`) moves points, not tokens.

Class attributes tell the rest of the library what a process needs:
  causal_network: the denoiser must use causal attention (autoregressive baseline).
  exact_likelihood: `nelbo` is the exact NLL, not a Monte Carlo bound (one pass scores it).
  mask_id (absorbing processes only): the k-reveal sampler strategies need it.
  continuous (the Gaussian family only): the sampler's state is a point of the embedding space.
Time runs over [0, 1] for every family (t = 1 is pure noise); discrete-time processes map it to
their step grid.

The network may emit W >= V logits (a vocabulary padded for sharding); processes drop ids >= V.
"""
import dataclasses
from typing import Callable

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
      argmax_BLV = jax.nn.one_hot(jnp.argmax(log_probs_BLV, axis=-1), log_probs_BLV.shape[-1], dtype=bool)
      return jnp.where(argmax_BLV, 0.0, -jnp.inf)
    tempered_BLV = jax.nn.log_softmax(log_probs_BLV / self.temperature, axis=-1)
    return jax.nn.log_softmax(self.filter(tempered_BLV), axis=-1)

  def __call__(self, log_probs_BLV: jax.Array, uniforms_BL: jax.Array) -> jax.Array:
    """Tokens int32[B, L] drawn from `log_probs(log_probs_BLV)` by inverse CDF, with one uniform
    per position instead of V Gumbel draws (the argmax itself at temperature 0)."""
    if self.temperature == 0:
      return jnp.argmax(log_probs_BLV, axis=-1).astype(jnp.int32)
    return inverse_cdf_draw(jnp.exp(self.log_probs(log_probs_BLV)), uniforms_BL)


def inverse_cdf_draw(probs_BLV: jax.Array, uniforms_BL: jax.Array) -> jax.Array:
  """One draw per position from (unnormalised, non-negative) probs_BLV, int32[B, L].

  A draw never lands on a zero-probability id.
  """
  cdf_BLV = jnp.cumsum(probs_BLV, axis=-1)
  below_BL = (cdf_BLV <= uniforms_BL[..., None] * cdf_BLV[..., -1:]).sum(axis=-1)
  tokens_BL = jnp.minimum(below_BL, probs_BLV.shape[-1] - 1).astype(jnp.int32)
  drawn_prob_BL = jnp.take_along_axis(probs_BLV, tokens_BL[..., None], axis=-1)[..., 0]
  greedy_BL = jnp.argmax(probs_BLV, axis=-1).astype(jnp.int32)
  return jnp.where(drawn_prob_BL > 0, tokens_BL, greedy_BL)  # only if u * total rounded up to total
