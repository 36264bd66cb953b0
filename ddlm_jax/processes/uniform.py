"""Uniform-noise discrete diffusion in continuous time: D3PM-uniform (Austin et al. 2021) taken to
continuous time as UDLM (Schiff et al. 2024, "Simple Guidance Mechanisms for Discrete Diffusion
Models").

Forward: each token is independently redrawn uniformly from all V ids (itself included) with
probability 1 - alpha_t,

  q(x_t | x_0) = Cat(alpha_t x_0 + (1 - alpha_t) 1 / V),
  q(x_t | x_s) = Cat(alpha_{t|s} x_s + (1 - alpha_{t|s}) 1 / V),   alpha_{t|s} = alpha_t / alpha_s, s < t.

An observed token is 1 + c_t times likelier to be x_0 than any other id, c_t = V alpha_t / (1 - alpha_t).

Denoiser (D3PM's and UDLM's parameterisation): the network emits a distribution x_theta over the V
ids, and the reverse step is p(x_s | x_t) = q(x_s | x_t, x_0 = x_theta)
∝ q(x_t | x_s) (alpha_s x_theta + (1 - alpha_s) 1 / V). That is exactly the ancestral step
sum_{x_0} q(x_s | x_t, x_0) p(x_0 | x_t) with the denoiser

  p(x_0 | x_t) ∝ x_theta(x_0) q(x_t | x_0):   x_theta's logit of the observed id gains log(1 + c_t),

Bayes' rule with x_theta as the prior (`posterior_log_probs`). So a network that ignores t still
returns x_0 = x_t as t -> 0, and the exact denoiser of a distribution is
x_theta ∝ p(x_0 | x_t) / q(x_t | x_0).

NELBO: the T -> infinity limit of the discrete-time VLB is a KL between jump processes. Where
x_t^l = i, the forward process jumps to each j != i at rate beta_t / V, beta_t = -alpha'_t / alpha_t;
its time reversal given x_0 jumps at rate beta_t / V * rho_j and the model's at beta_t / V * rhohat_j,

  rho_j = xbar_t[j] / xbar_t[i],            xbar_t     = V alpha_t x_0     + (1 - alpha_t) 1,
  rhohat_j = xbar_theta[j] / xbar_theta[i], xbar_theta = V alpha_t x_theta + (1 - alpha_t) 1,

  NELBO(x_0) = int_0^1 E_{x_t ~ q(.|x_0)} sum_l beta_t / V
                   sum_{j != i} [rhohat_j - rho_j - rho_j log(rhohat_j / rho_j)] dt
               + L * KL(q(x_1 | x_0) || Uniform),

UDLM's closed form; the prior term is zero unless alpha(1) > 0 (log-linear schedule). The
integrand is computed without cancellation for V in the tens of thousands and t near 0 or 1: with
u_j = (rhohat_j - rho_j) / c_t and d_j = rhohat_j / rho_j - 1, each term is
beta_t / V * rho_j (d_j - log(1 + d_j)) = w(t) u_j phi(d_j), with w(t) = -alpha'_t / (1 - alpha_t)
(the masked process's weight), phi(d) = 1 - log(1 + d) / d, and u_j = e_j - e_i / (1 + c_t) in terms
of e = p(. | x_t) - x_0 (see `jump_divergence`).

The process is a `base.TokenProcess` (`processes/base.py`) without a [MASK] state.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp

from ddlm_jax.processes import base
from ddlm_jax.schedules import Schedule


def jump_divergence(log_x_theta_BLV: jax.Array, xt_BL: jax.Array, x0_BL: jax.Array,
                    snr: jax.Array) -> jax.Array:
  """The NELBO integrand at each position, divided by w(t) = -alpha'_t / (1 - alpha_t).

  sum_{j != x_t} u_j phi(d_j) = c_t / V * sum_{j != x_t} [rhohat_j - rho_j - rho_j log(rhohat_j / rho_j)]
  (module docstring), every term >= 0, written so that it neither cancels nor overflows: u_j from
  e = p(x_0 | x_t) - one_hot(x_0) with e at x_0 as expm1(log p); log(rhohat_j / rho_j) as log1p(d_j)
  near d_j = 0 and as a difference of logs away from it; phi by its series near 0.

  Args:
    log_x_theta_BLV: the network's log x_theta over the V ids, float32[B, L, V].
    xt_BL: noisy tokens, int32[B, L].
    x0_BL: clean tokens, int32[B, L].
    snr: c_t = V alpha_t / (1 - alpha_t), broadcastable to [B, L, 1].

  Returns:
    float32[B, L].
  """
  vocab_size = log_x_theta_BLV.shape[-1]
  observed_BLV = jax.nn.one_hot(xt_BL, vocab_size, dtype=bool)
  clean_BLV = jax.nn.one_hot(x0_BL, vocab_size, dtype=bool)
  log_posterior_BLV = posterior_log_probs(log_x_theta_BLV, xt_BL, snr)
  error_BLV = jnp.where(clean_BLV, jnp.expm1(log_posterior_BLV), jnp.exp(log_posterior_BLV))
  error_at_observed_BL1 = base.token_log_likelihood(error_BLV, xt_BL)[..., None]
  u_BLV = error_BLV - error_at_observed_BL1 / (1.0 + snr)
  # rho_j = (1 + c [j = x_0]) / (1 + c [x_t = x_0]); rhohat_j = (1 + c x_theta_j) / (1 + c x_theta_{x_t}).
  log_rho_BLV = (jnp.where(clean_BLV, jnp.log1p(snr), 0.0)
                 - jnp.where((xt_BL == x0_BL)[..., None], jnp.log1p(snr), 0.0))
  log1p_c_x_theta_BLV = jnp.log1p(snr * jnp.exp(log_x_theta_BLV))
  log_rhohat_BLV = log1p_c_x_theta_BLV - base.token_log_likelihood(log1p_c_x_theta_BLV, xt_BL)[..., None]
  d_BLV = snr * u_BLV / jnp.exp(log_rho_BLV)
  near_BLV = jnp.abs(d_BLV) < 0.5
  log_ratio_BLV = jnp.where(near_BLV, jnp.log1p(jnp.where(near_BLV, d_BLV, 0.0)),
                            log_rhohat_BLV - log_rho_BLV)
  small_BLV = jnp.abs(d_BLV) < 1e-2
  d_small_BLV = jnp.where(small_BLV, d_BLV, 0.0)  # each branch sees only its own inputs: finite gradients
  phi_BLV = jnp.where(small_BLV, d_small_BLV * (1 / 2 - d_small_BLV * (1 / 3 - d_small_BLV / 4)),
                      1.0 - log_ratio_BLV / jnp.where(small_BLV, 1.0, d_BLV))
  return jnp.where(observed_BLV, 0.0, u_BLV * phi_BLV).sum(axis=-1)


def posterior_log_probs(log_x_theta_BLV: jax.Array, xt_BL: jax.Array, snr: jax.Array) -> jax.Array:
  """log p(x_0 | x_t) ∝ log x_theta(x_0) + log q(x_t | x_0): the observed id gains log(1 + c_t).

  Args:
    log_x_theta_BLV: float32[B, L, V].
    xt_BL: noisy tokens, int32[B, L].
    snr: c_t, broadcastable to [B, L, 1].
  """
  observed_BLV = jax.nn.one_hot(xt_BL, log_x_theta_BLV.shape[-1], dtype=bool)
  return jax.nn.log_softmax(log_x_theta_BLV + jnp.where(observed_BLV, jnp.log1p(snr), 0.0), axis=-1)


@dataclasses.dataclass(frozen=True)
class UniformDiffusion(base.CanvasReadout):
  """The uniform-noise process (no [MASK]: samplers use its exact ancestral step only).

  Attributes:
    vocab_size: V, the ids that noise is drawn from and the denoiser predicts over.
    schedule: alpha(t).
    antithetic_time: draw a batch's times stratified (see `base.sample_times`).
  """
  vocab_size: int
  schedule: Schedule = Schedule("loglinear")
  antithetic_time: bool = True
  causal_network = False
  exact_likelihood = False
  absorbing = False
  continuous = False

  def __post_init__(self):
    if self.vocab_size < 2:
      raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")

  def snr(self, t: jax.Array) -> jax.Array:
    """c_t = V alpha_t / (1 - alpha_t): q(x_t = x_0 | x_0) / q(x_t = j | x_0) - 1 for j != x_0."""
    alpha = jnp.maximum(self.schedule.alpha(t), 0.0)  # cos(pi / 2) rounds below 0 in float32
    return self.vocab_size * alpha / self.schedule.mask_prob(t)

  def corrupt(self, x0_BL: jax.Array, t_B: jax.Array, key: jax.Array,
              keep_BL: jax.Array | None = None) -> jax.Array:
    """Samples x_t ~ q(x_t | x_0): each token is redrawn uniformly with probability 1 - alpha(t).

    Args:
      x0_BL: clean tokens, int32[B, L].
      t_B: times, float32[B].
      key: PRNG key.
      keep_BL: optional bool[B, L]; True positions (e.g. an SFT prompt) are never redrawn.

    Returns:
      x_t, int32[B, L].
    """
    redraw_key, token_key = jax.random.split(key)
    redrawn_BL = jax.random.uniform(redraw_key, x0_BL.shape) < self.schedule.mask_prob(t_B)[:, None]
    if keep_BL is not None:
      redrawn_BL &= ~keep_BL
    noise_BL = jax.random.randint(token_key, x0_BL.shape, 0, self.vocab_size, dtype=x0_BL.dtype)
    return jnp.where(redrawn_BL, noise_BL, x0_BL)

  def x_theta_log_probs(self, logits_BLW: jax.Array) -> jax.Array:
    """log x_theta, the network's distribution over the V ids (float32[B, L, V]).

    It is the prior of Bayes' rule, not p(x_0 | x_t): see `denoiser_log_probs`.
    """
    return jax.nn.log_softmax(logits_BLW[..., :self.vocab_size].astype(jnp.float32), axis=-1)

  def denoiser_log_probs(self, logits_BLW: jax.Array, xt_BL: jax.Array, t: jax.Array) -> jax.Array:
    """The denoiser log p(x_0 | x_t) ∝ log x_theta + log q(x_t | x_0), float32[B, L, V].

    Args:
      logits_BLW: the network's logits at x_t.
      xt_BL: int32[B, L].
      t: a time, float32[] or float32[B].
    """
    snr_B11 = self.snr(jnp.asarray(t, jnp.float32))[..., None, None]
    return posterior_log_probs(self.x_theta_log_probs(logits_BLW), xt_BL, snr_B11)

  def prior_nats_per_token(self) -> float:
    """KL(q(x_1 | x_0) || Uniform) per token; zero when alpha(1) = 0.

    q(x_1 | x_0) puts V q = 1 + (V - 1) alpha(1) on x_0 and V q = 1 - alpha(1) on each other id.
    """
    final_alpha, vocab_size = self.schedule.final_alpha, self.vocab_size
    if final_alpha == 0:
      return 0.0
    return ((final_alpha + (1 - final_alpha) / vocab_size) * math.log1p((vocab_size - 1) * final_alpha)
            + (1 - final_alpha) * (vocab_size - 1) / vocab_size * math.log1p(-final_alpha))

  def nelbo(self, model_fn: base.ModelFn, x0_BL: jax.Array, key: jax.Array,
            prompt_mask_BL: jax.Array | None = None, t_B: jax.Array | None = None) -> base.Nelbo:
    """One-sample Monte Carlo estimate of the NELBO of each sequence (module docstring).

    Args:
      model_fn: (x_t int32[B, L], t float32[B]) -> logits float32[B, L, W].
      x0_BL: clean tokens, int32[B, L].
      key: PRNG key.
      prompt_mask_BL: optional bool[B, L]; True marks a prompt position (SFT): never noised,
        never scored, so the bound is on -log p(response | prompt).
      t_B: optional fixed times; drawn with `base.sample_times` if None.
    """
    t_key, noise_key = jax.random.split(key)
    if t_B is None:
      t_B = base.sample_times(t_key, x0_BL.shape[0], self.antithetic_time)
    xt_BL = self.corrupt(x0_BL, t_B, noise_key, keep_BL=prompt_mask_BL)
    log_x_theta_BLV = self.x_theta_log_probs(model_fn(xt_BL, t_B))
    divergence_BL = jump_divergence(log_x_theta_BLV, xt_BL, x0_BL, self.snr(t_B)[:, None, None])
    scored_BL = base.scored_mask(x0_BL, prompt_mask_BL)
    num_tokens_B = scored_BL.sum(axis=-1).astype(jnp.float32)
    diffusion_nats_B = self.schedule.loss_weight(t_B) * jnp.where(scored_BL, divergence_BL, 0.0).sum(-1)
    return base.Nelbo(nats_B=diffusion_nats_B + self.prior_nats_per_token() * num_tokens_B,
                      num_tokens_B=num_tokens_B)

  def loss(self, model_fn: base.ModelFn, x0_BL: jax.Array, key: jax.Array,
           prompt_mask_BL: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Training loss: NELBO in nats per scored position (EOS and padding included), and metrics."""
    return base.per_position_loss(self.nelbo(model_fn, x0_BL, key, prompt_mask_BL))

  def reverse_probs(self, x0_probs_BLV: jax.Array, xt_BL: jax.Array, t: jax.Array, s: jax.Array) -> jax.Array:
    """p(x_s | x_t) = sum_{x_0} q(x_s | x_t, x_0) p(x_0 | x_t), unnormalised, in O(V) per position.

    With w(x_0) = p(x_0 | x_t) / q(x_t | x_0), the sum is q(x_t | x_s) * sum_{x_0} w(x_0) q(x_s | x_0):
    a likelihood times a mixture, both scaled by constants here.

    Args:
      x0_probs_BLV: p(x_0 | x_t), possibly unnormalised, float32[B, L, V].
      xt_BL: int32[B, L].
      t, s: times, s < t, float32[].

    Returns:
      float32[B, L, V].
    """
    alpha_t, alpha_s = (jnp.maximum(self.schedule.alpha(time), 0.0) for time in (t, s))
    noise_t, noise_s = self.schedule.mask_prob(t), self.schedule.mask_prob(s)
    observed_BLV = jax.nn.one_hot(xt_BL, self.vocab_size, dtype=bool)
    signal_t = self.vocab_size * alpha_t
    w_BLV = x0_probs_BLV / jnp.where(observed_BLV, noise_t + signal_t, noise_t)  # V q(x_t | x_0)
    mixture_BLV = self.vocab_size * alpha_s * w_BLV + noise_s * w_BLV.sum(-1, keepdims=True)  # V q(x_s | x_0)
    # V alpha_s q(x_t | x_s)
    likelihood_BLV = jnp.where(observed_BLV, noise_t - noise_s + signal_t, noise_t - noise_s)
    return likelihood_BLV * mixture_BLV

  def reverse_step(self, state: base.Canvas, logits_BLW: jax.Array, t: jax.Array, s: jax.Array,
                   step_keys_B: jax.Array, settings: base.StepSettings) -> base.Canvas:
    """The exact ancestral step: every free position is redrawn from p(x_s | x_t) (`reverse_probs`),
    with settings.draw's temperature, top-k and top-p applied to p(x_0 | x_t) first; at s = 0 it is
    the x_0 draw `settings.draw(log p(x_0 | x_t), token_u_BL)` itself. One uniform per position."""
    canvas_BL = state.tokens_BL
    token_u_BL, _ = base.step_uniforms(step_keys_B, canvas_BL.shape[1])
    x0_probs_BLV = jnp.exp(settings.draw.log_probs(self.denoiser_log_probs(logits_BLW, canvas_BL, t)))
    xs_probs_BLV = jnp.where(s == 0, x0_probs_BLV, self.reverse_probs(x0_probs_BLV, canvas_BL, t, s))
    return state.moved_to(base.inverse_cdf_draw(xs_probs_BLV, token_u_BL))

  def initial_state(self, model: base.ModelFn, fixed_tokens_BL: jax.Array, fixed_BL: jax.Array,
                    row_keys_B: jax.Array) -> base.Canvas:
    """A draw from the prior p(x_1) = Uniform over the V ids, fixed positions in place; row b draws
    with row_keys_B[b] only, and the model is not read."""
    del model
    length = fixed_BL.shape[1]
    noise_BL = jax.vmap(lambda row_key: jax.random.randint(row_key, (length,), 0, self.vocab_size))(row_keys_B)
    return base.Canvas(jnp.where(fixed_BL, fixed_tokens_BL, noise_BL).astype(jnp.int32), fixed_BL)
