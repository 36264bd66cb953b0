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

The process is a `base.AbsorbingProcess` (`processes/base.py`).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp

from ddlm_jax.processes import base
from ddlm_jax.schedules import Schedule


@dataclasses.dataclass(frozen=True)
class MaskedDiffusion(base.CanvasReadout):
  """The absorbing process.

  Attributes:
    vocab_size: V, the model's output vocabulary including [MASK].
    mask_id: id of [MASK].
    schedule: alpha(t).
    antithetic_time: draw a batch's times stratified (see `base.sample_times`).
  """
  vocab_size: int
  mask_id: int
  schedule: Schedule = Schedule()
  antithetic_time: bool = True
  causal_network = False
  exact_likelihood = False
  absorbing = True
  continuous = False

  def __post_init__(self):
    if not 0 <= self.mask_id < self.vocab_size:
      raise ValueError(f"mask_id {self.mask_id} is outside the vocabulary of size {self.vocab_size}")

  def corrupt(self, x0_BL: jax.Array, t_B: jax.Array, key: jax.Array,
              keep_BL: jax.Array | None = None) -> jax.Array:
    """Samples x_t ~ q(x_t | x_0): each token becomes [MASK] with probability 1 - alpha(t).

    Args:
      x0_BL: clean tokens, int32[B, L].
      t_B: times, float32[B].
      key: PRNG key.
      keep_BL: optional bool[B, L]; True positions (e.g. an SFT prompt) are never masked.

    Returns:
      x_t, int32[B, L].
    """
    mask_prob_B1 = self.schedule.mask_prob(t_B)[:, None]
    masked_BL = jax.random.uniform(key, x0_BL.shape) < mask_prob_B1
    if keep_BL is not None:
      masked_BL &= ~keep_BL
    return jnp.where(masked_BL, self.mask_id, x0_BL)

  def masked_log_probs(self, logits_BLW: jax.Array) -> jax.Array:
    """log p(x_0 | x_t) at a masked position: the network's softmax without [MASK], float32[B, L, V]
    (what the bound and the ancestral step read; they never read a clean position's)."""
    return base.restricted_log_softmax(logits_BLW, self.vocab_size, (self.mask_id,))

  def denoiser_log_probs(self, logits_BLW: jax.Array, xt_BL: jax.Array, t: jax.Array) -> jax.Array:
    """log p(x_0 | x_t), float32[B, L, V]: `masked_log_probs` at masked positions, the token itself
    (carried over) at clean ones; t is not read."""
    del t
    clean_BLV = jnp.where(jax.nn.one_hot(xt_BL, self.vocab_size, dtype=bool), 0.0, -jnp.inf)
    return jnp.where((xt_BL == self.mask_id)[..., None], self.masked_log_probs(logits_BLW), clean_BLV)

  def prior_nats_per_token(self) -> float:
    """KL(q(x_1 | x_0) || p(x_1)) per token; zero when alpha(1) = 0. A Python number (static under jit)."""
    final_alpha = self.schedule.final_alpha
    return final_alpha * math.log(self.vocab_size - 1) if final_alpha > 0 else 0.0

  def nelbo(self, model_fn: base.ModelFn, x0_BL: jax.Array, key: jax.Array,
            prompt_mask_BL: jax.Array | None = None, t_B: jax.Array | None = None) -> base.Nelbo:
    """One-sample Monte Carlo estimate of the NELBO of each sequence.

    Args:
      model_fn: (x_t int32[B, L], t float32[B]) -> logits float32[B, L, W].
      x0_BL: clean tokens, int32[B, L].
      key: PRNG key.
      prompt_mask_BL: optional bool[B, L]; True marks a prompt position (SFT): never masked,
        never scored, so the bound is on -log p(response | prompt).
      t_B: optional fixed times; drawn with `base.sample_times` if None.
    """
    t_key, mask_key = jax.random.split(key)
    if t_B is None:
      t_B = base.sample_times(t_key, x0_BL.shape[0], self.antithetic_time)
    xt_BL = self.corrupt(x0_BL, t_B, mask_key, keep_BL=prompt_mask_BL)
    # -log p(x_0 | x_t) under `masked_log_probs`, read where masked
    nll_BL = base.cross_entropy(model_fn(xt_BL, t_B), x0_BL, self.vocab_size, (self.mask_id,))
    num_tokens_B = base.scored_mask(x0_BL, prompt_mask_BL).sum(axis=-1).astype(jnp.float32)
    masked_BL = xt_BL == self.mask_id
    diffusion_nats_B = self.schedule.loss_weight(t_B) * jnp.where(masked_BL, nll_BL, 0.0).sum(-1)
    return base.Nelbo(nats_B=diffusion_nats_B + self.prior_nats_per_token() * num_tokens_B,
                      num_tokens_B=num_tokens_B)

  def loss(self, model_fn: base.ModelFn, x0_BL: jax.Array, key: jax.Array,
           prompt_mask_BL: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Training loss: NELBO in nats per scored position (EOS and padding included), and metrics."""
    return base.per_position_loss(self.nelbo(model_fn, x0_BL, key, prompt_mask_BL))

  def unmask_prob(self, t: jax.Array, s: jax.Array) -> jax.Array:
    """Probability that a token masked at time t is revealed by time s < t.

    (alpha_s - alpha_t) / (1 - alpha_t), written as 1 - (1 - alpha_s) / (1 - alpha_t) so that it is
    exactly 1 at s = 0 in floating point.
    """
    return 1.0 - self.schedule.mask_prob(s) / self.schedule.mask_prob(t)

  def reverse_step(self, state: base.Canvas, logits_BLW: jax.Array, t: jax.Array, s: jax.Array,
                   step_keys_B: jax.Array, settings: base.StepSettings) -> base.Canvas:
    """The exact ancestral step x_t -> x_s (MDLM): each masked token is revealed with probability
    `unmask_prob(t, s)`, as a draw from p(x_0 | x_t) with settings.draw; clean tokens stay."""
    canvas_BL = state.tokens_BL
    token_u_BL, choice_u_BL = base.step_uniforms(step_keys_B, canvas_BL.shape[1])
    candidates_BL = settings.draw(self.masked_log_probs(logits_BLW), token_u_BL)  # kept where masked only
    reveal_BL = (canvas_BL == self.mask_id) & (choice_u_BL < self.unmask_prob(t, s))
    return state.moved_to(jnp.where(reveal_BL, candidates_BL, canvas_BL))

  def initial_state(self, model: base.ModelFn, fixed_tokens_BL: jax.Array, fixed_BL: jax.Array,
                    row_keys_B: jax.Array) -> base.Canvas:
    """A draw from the prior p(x_1): [MASK] everywhere except fixed positions; row b draws with
    row_keys_B[b] only, and the model is not read.

    Under a schedule with alpha(1) > 0, each free position is clean with probability alpha(1),
    uniform over the non-mask tokens, matching `prior_nats_per_token`.
    """
    del model
    final_alpha, length = self.schedule.final_alpha, fixed_BL.shape[1]

    def prior_row(row_key):
      clean_key, token_key = jax.random.split(row_key)
      clean_L = jax.random.uniform(clean_key, (length,)) < final_alpha
      tokens_L = jax.random.randint(token_key, (length,), 0, self.vocab_size - 1)
      return jnp.where(clean_L, jnp.where(tokens_L >= self.mask_id, tokens_L + 1, tokens_L), self.mask_id)

    prior_BL = jax.vmap(prior_row)(row_keys_B) if final_alpha > 0 else jnp.full(fixed_BL.shape, self.mask_id)
    return base.Canvas(jnp.where(fixed_BL, fixed_tokens_BL, prior_BL).astype(jnp.int32), fixed_BL)
