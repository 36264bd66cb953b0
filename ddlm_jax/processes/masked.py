"""Masked (absorbing-state) diffusion in continuous time: MDLM (Sahoo et al. 2024), LLaDA (Nie et al. 2025).

Forward: each token independently becomes [MASK] with probability 1 - alpha(t).
The denoiser predicts x_0 at masked positions ("SUBS" parameterisation: it never predicts [MASK],
and clean tokens are carried over), so the negative ELBO is

  NELBO(x_0) = E_t E_{x_t ~ q(.|x_0)} [ -alpha'(t) / (1 - alpha(t)) * sum_{l: x_t^l = MASK} -log p(x_0^l | x_t) ]
               + prior term,

a weighted cross-entropy on masked positions (weight 1/t for the linear schedule). The prior term
is zero unless alpha(1) > 0 (log-linear schedule): then the prior p(x_1) leaves a token clean with
probability alpha(1), drawn uniformly from the V - 1 non-mask tokens, and the term is
alpha(1) log(V - 1) nats per scored token.

Everything here takes `model_fn(x_t_BL, t_B) -> logits_BLV` and never imports a network.
"""
import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from ddlm_jax.schedules import Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
MIN_TIME = 1e-6


@dataclasses.dataclass(frozen=True)
class MaskedDiffusion:
  """Settings of the absorbing process.

  Attributes:
    vocab_size: V, the model's output vocabulary including [MASK].
    mask_id: id of [MASK].
    schedule: alpha(t).
    antithetic_time: draw a batch's times as one stratified (low-discrepancy) grid
      t_b = (u + b / B) mod 1 instead of B independent uniforms; same mean, lower variance.
  """
  vocab_size: int
  mask_id: int
  schedule: Schedule = Schedule()
  antithetic_time: bool = True

  def __post_init__(self):
    if not 0 <= self.mask_id < self.vocab_size:
      raise ValueError(f"mask_id {self.mask_id} is outside the vocabulary of size {self.vocab_size}")


@flax.struct.dataclass
class Nelbo:
  """A one-sample Monte Carlo estimate of the negative ELBO, per sequence.

  Attributes:
    nats_B: NELBO of each sequence in nats (float32[B]).
    num_tokens_B: number of scored (non-prompt) positions of each sequence (float32[B]).
  """
  nats_B: jax.Array
  num_tokens_B: jax.Array


def sample_times(key: jax.Array, batch_size: int, antithetic: bool) -> jax.Array:
  """Times t_B in [MIN_TIME, 1], uniform marginally; stratified over the batch if antithetic."""
  if antithetic:
    offset = jax.random.uniform(key, ())
    t_B = jnp.mod(offset + jnp.arange(batch_size) / batch_size, 1.0)
  else:
    t_B = jax.random.uniform(key, (batch_size,))
  return jnp.clip(t_B, MIN_TIME, 1.0)


def corrupt(process: MaskedDiffusion, x0_BL: jax.Array, t_B: jax.Array, key: jax.Array,
            keep_BL: jax.Array | None = None) -> jax.Array:
  """Samples x_t ~ q(x_t | x_0): each token becomes [MASK] with probability 1 - alpha(t).

  Args:
    process: the masked process.
    x0_BL: clean tokens, int32[B, L].
    t_B: times, float32[B].
    key: PRNG key.
    keep_BL: optional bool[B, L]; True positions (e.g. an SFT prompt) are never masked.

  Returns:
    x_t, int32[B, L].
  """
  mask_prob_B1 = process.schedule.mask_prob(t_B)[:, None]
  masked_BL = jax.random.uniform(key, x0_BL.shape) < mask_prob_B1
  if keep_BL is not None:
    masked_BL &= ~keep_BL
  return jnp.where(masked_BL, process.mask_id, x0_BL)


def x0_log_probs(process: MaskedDiffusion, logits_BLW: jax.Array) -> jax.Array:
  """log p(x_0 | x_t) with [MASK] excluded (float32[B, L, V]).

  The network may emit W >= V logits (a vocabulary padded for sharding); ids >= V are dropped.
  """
  logits_BLV = logits_BLW[..., :process.vocab_size].astype(jnp.float32).at[..., process.mask_id].set(-jnp.inf)
  return jax.nn.log_softmax(logits_BLV, axis=-1)


def prior_nats_per_token(process: MaskedDiffusion) -> float:
  """KL(q(x_1 | x_0) || p(x_1)) per token; zero when alpha(1) = 0."""
  final_alpha = process.schedule.final_alpha
  return final_alpha * float(jnp.log(process.vocab_size - 1)) if final_alpha > 0 else 0.0


def nelbo(process: MaskedDiffusion, model_fn: ModelFn, x0_BL: jax.Array, key: jax.Array,
          prompt_mask_BL: jax.Array | None = None, t_B: jax.Array | None = None) -> Nelbo:
  """One-sample Monte Carlo estimate of the NELBO of each sequence.

  Args:
    process: the masked process.
    model_fn: (x_t int32[B, L], t float32[B]) -> logits float32[B, L, V].
    x0_BL: clean tokens, int32[B, L].
    key: PRNG key.
    prompt_mask_BL: optional bool[B, L]; True marks a prompt position (SFT): never masked,
      never scored, so the bound is on -log p(response | prompt).
    t_B: optional fixed times; drawn with `sample_times` if None.

  Returns:
    A `Nelbo` with per-sequence nats and scored token counts.
  """
  t_key, mask_key = jax.random.split(key)
  batch_size = x0_BL.shape[0]
  if t_B is None:
    t_B = sample_times(t_key, batch_size, process.antithetic_time)
  xt_BL = corrupt(process, x0_BL, t_B, mask_key, keep_BL=prompt_mask_BL)
  log_probs_BLV = x0_log_probs(process, model_fn(xt_BL, t_B))
  nll_BL = -jnp.take_along_axis(log_probs_BLV, x0_BL[..., None], axis=-1)[..., 0]
  masked_BL = xt_BL == process.mask_id
  scored_BL = jnp.ones_like(masked_BL) if prompt_mask_BL is None else ~prompt_mask_BL
  num_tokens_B = scored_BL.sum(axis=-1).astype(jnp.float32)
  diffusion_nats_B = process.schedule.loss_weight(t_B) * jnp.where(masked_BL, nll_BL, 0.0).sum(-1)
  nats_B = diffusion_nats_B + prior_nats_per_token(process) * num_tokens_B
  return Nelbo(nats_B=nats_B, num_tokens_B=num_tokens_B)


def loss(process: MaskedDiffusion, model_fn: ModelFn, x0_BL: jax.Array, key: jax.Array,
         prompt_mask_BL: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Training loss: NELBO in nats per scored position (EOS and padding included), and metrics."""
  estimate = nelbo(process, model_fn, x0_BL, key, prompt_mask_BL)
  nats_per_position = estimate.nats_B.sum() / jnp.maximum(estimate.num_tokens_B.sum(), 1.0)
  return nats_per_position, {"loss": nats_per_position}


def unmask_prob(process: MaskedDiffusion, t: jax.Array, s: jax.Array) -> jax.Array:
  """Probability that a token masked at time t is revealed by time s < t.

  (alpha_s - alpha_t) / (1 - alpha_t), written as 1 - (1 - alpha_s) / (1 - alpha_t) so that it is
  exactly 1 at s = 0 in floating point.
  """
  return 1.0 - process.schedule.mask_prob(s) / process.schedule.mask_prob(t)


def reverse_step(process: MaskedDiffusion, canvas_BL: jax.Array, candidates_BL: jax.Array,
                 t: jax.Array, s: jax.Array, reveal_u_BL: jax.Array) -> jax.Array:
  """The exact ancestral step x_t -> x_s (MDLM): each masked token is revealed with probability
  `unmask_prob(t, s)`, as its candidate drawn from p(x_0 | x_t); clean tokens stay.

  Args:
    process: the masked process.
    canvas_BL: x_t, int32[B, L].
    candidates_BL: draws from p(x_0 | x_t) at every position, int32[B, L].
    t, s: the step's start and end times, s < t.
    reveal_u_BL: uniforms in [0, 1), float32[B, L].
  """
  reveal_BL = (canvas_BL == process.mask_id) & (reveal_u_BL < unmask_prob(process, t, s))
  return jnp.where(reveal_BL, candidates_BL, canvas_BL)


def initial_canvas(process: MaskedDiffusion, fixed_tokens_BL: jax.Array, fixed_BL: jax.Array,
                   key: jax.Array) -> jax.Array:
  """A draw from the prior p(x_1): [MASK] everywhere except fixed positions.

  Under a schedule with alpha(1) > 0, each free position is clean with probability alpha(1),
  uniform over the non-mask tokens, matching `prior_nats_per_token`.
  """
  canvas_BL = jnp.where(fixed_BL, fixed_tokens_BL, process.mask_id)
  final_alpha = process.schedule.final_alpha
  if final_alpha == 0:
    return canvas_BL
  clean_key, token_key = jax.random.split(key)
  clean_BL = (jax.random.uniform(clean_key, canvas_BL.shape) < final_alpha) & ~fixed_BL
  tokens_BL = jax.random.randint(token_key, canvas_BL.shape, 0, process.vocab_size - 1)
  tokens_BL = jnp.where(tokens_BL >= process.mask_id, tokens_BL + 1, tokens_BL)
  return jnp.where(clean_BL, tokens_BL, canvas_BL)
