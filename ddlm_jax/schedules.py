"""Noise schedules of the discrete diffusion processes.

A schedule gives alpha(t), the probability that a token is still clean at time t in [0, 1],
its derivative alpha'(t), and the continuous-time ELBO weight -alpha'(t) / (1 - alpha(t)).
alpha(0) = 1. alpha(1) = 0 for 'linear' and 'cosine'; 'loglinear' (MDLM, Sahoo et al. 2024)
stops at alpha(1) = eps, and its prior term accounts for the tokens left clean at t = 1.
"""
import dataclasses

import jax.numpy as jnp

SCHEDULES = ("linear", "cosine", "loglinear")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """alpha(t) of a masking (or uniform) process.

  Attributes:
    kind: 'linear' (alpha = 1 - t, weight 1/t), 'cosine' (alpha = cos(pi t / 2)) or
      'loglinear' (alpha = 1 - (1 - eps) t, i.e. total noise sigma(t) = -log alpha(t)).
    eps: alpha(1) of the log-linear schedule.
  """
  kind: str = "linear"
  eps: float = 1e-3

  def __post_init__(self):
    if self.kind not in SCHEDULES:
      raise ValueError(f"schedule kind {self.kind!r} is not one of {SCHEDULES}")
    if not 0.0 < self.eps < 1.0:
      raise ValueError(f"schedule eps must lie in (0, 1), got {self.eps}")

  def alpha(self, t):
    """Probability that a token is uncorrupted at time t (array, any shape)."""
    if self.kind == "linear":
      return 1.0 - t
    if self.kind == "cosine":
      return jnp.cos(0.5 * jnp.pi * t)
    return 1.0 - (1.0 - self.eps) * t

  def alpha_prime(self, t):
    """d alpha / dt."""
    if self.kind == "linear":
      return -jnp.ones_like(t)
    if self.kind == "cosine":
      return -0.5 * jnp.pi * jnp.sin(0.5 * jnp.pi * t)
    return -(1.0 - self.eps) * jnp.ones_like(t)

  def mask_prob(self, t):
    """1 - alpha(t), computed without cancellation near t = 0."""
    if self.kind == "cosine":
      return 2.0 * jnp.sin(0.25 * jnp.pi * t) ** 2
    return (1.0 - self.final_alpha) * t

  def time_at_mask_prob(self, mask_prob):
    """The inverse of `mask_prob`: the time t in [0, 1] with mask_prob(t) = mask_prob, for
    mask_prob in [0, mask_prob(1)]."""
    if self.kind == "cosine":
      return (4.0 / jnp.pi) * jnp.arcsin(jnp.sqrt(0.5 * mask_prob))
    return mask_prob / (1.0 - self.final_alpha)

  def loss_weight(self, t):
    """ELBO weight -alpha'(t) / (1 - alpha(t)); 1/t for the linear and log-linear schedules."""
    return -self.alpha_prime(t) / self.mask_prob(t)

  @property
  def final_alpha(self) -> float:
    """alpha(1): the fraction of tokens still clean at the end of the forward process."""
    return self.eps if self.kind == "loglinear" else 0.0
