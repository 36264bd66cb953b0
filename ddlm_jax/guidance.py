"""Guidance: steering a sampler toward a condition.

Classifier-free guidance (Ho & Salimans 2022). A conditional model is trained with its condition
(the source segment of a sequence-to-sequence row) dropped, i.e. replaced by [PAD], in a share of
the rows (`drop_condition`, `config.train.condition_dropout`). At sampling time the model runs on
the canvas with and without its condition, and the outputs are mixed,

  out_w = out_uncond + w (out_cond - out_uncond),

with the guidance scale w a sampler setting: w = 0 is the unconditional model, w = 1 the
conditional one, w > 1 sharpens toward the condition. For token families `out` is the logits, so
the guided denoiser is p(x_0 | x_t) ∝ p_uncond^(1-w) p_cond^w; for the Gaussian family it is the
predicted clean embedding z0_hat (equivalently the predicted noise, an affine function of it).

Classifier guidance (Diffusion-LM, Li et al. 2022, Sec. 5.2; Dhariwal & Nichol 2021). A classifier
log p(c | z_t, t) on noisy embeddings steers an unconditional Gaussian model: each reverse step's
proposal z_s ~ N(mu, v) moves toward the maximum of

  log N(z_s; mu, v) + gamma log p(c | z_s, s)

(the fluency term keeps z_s near what the language model proposes; gamma is the guidance scale,
1 / lambda for Diffusion-LM's fluency weight lambda), and the step's noise is added after. The
maximum solves z = mu + gamma v grad log p(c | z, s); `classifier_guidance` runs a few fixed-point
iterations of that from z = mu (preconditioned gradient ascent with unit step). The first is
Dhariwal & Nichol's mu + gamma v grad log p(c | mu), and all stay stable as v -> 0.
`samplers.sample` calls the update every step. `control.py` trains such a classifier and makes its
target log-prob (`control.attribute_log_prob_fn`).

This module is pure (no optimiser, no network). A guide is a pytree (`ClassifierGuide`): its
arrays, such as a classifier's parameters, are traced arguments of a jitted sampler, so a new
guide of the same structure reuses the compiled sampler.
"""
import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

# (z_s float32[B, L, D], s float32[B]) -> log p(target | z_s, s) float32[B]; a pytree callable
# (e.g. `control.AttributeLogProb`) or a plain function.
TargetLogProbFn = Callable[[jax.Array, jax.Array], jax.Array]
# (mean float32[B, L, D], posterior_var [B, 1, 1], s float32[B], free bool[B, L]) -> float32[B, L, D]
GuideFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def drop_condition(inputs_BL: jax.Array, condition_BL: jax.Array, null: jax.Array) -> jax.Array:
  """The inputs with their condition replaced by the null condition.

  Args:
    inputs_BL: int32[B, L] tokens, or float[B, L, D] points of the Gaussian family.
    condition_BL: bool[B, L], the condition's positions (e.g. a source segment; its closing
      [EOS] stays, so the layout of the row is kept).
    null: the null token ([PAD]) or its embedding float[D].
  """
  if inputs_BL.ndim == 3:
    condition_BL = condition_BL[..., None]
  return jnp.where(condition_BL, null, inputs_BL).astype(inputs_BL.dtype)


def mix(cond_out: jax.Array, uncond_out: jax.Array, scale: float) -> jax.Array:
  """out_uncond + scale (out_cond - out_uncond)."""
  return uncond_out + scale * (cond_out - uncond_out)


def classifier_free(model_fn: Callable, condition_BL: jax.Array, null: jax.Array,
                    scale: float) -> Callable:
  """model_fn(x_t, t) with classifier-free guidance: one network call on the canvas and its
  condition-dropped copy, stacked along the batch, then `mix`.

  Args:
    model_fn: (x_t [B, L, ...], t float32[B]) -> out [B, L, W] (logits or z0_hat).
    condition_BL: bool[B, L], the condition's positions.
    null: see `drop_condition`.
    scale: the guidance scale w.
  """
  def guided_fn(x_BL, t_B):
    both = model_fn(jnp.concatenate([x_BL, drop_condition(x_BL, condition_BL, null)]),
                    jnp.concatenate([t_B, t_B]))
    cond_out, uncond_out = jnp.split(both, 2)
    return mix(cond_out, uncond_out, scale)

  return guided_fn


@dataclasses.dataclass(frozen=True)
class ClassifierGuidance:
  """Settings of classifier guidance (Diffusion-LM's control).

  Attributes:
    scale: gamma, the weight of log p(c | z_s, s) against the fluency term log N(z_s; mu, v).
    num_steps: fixed-point iterations toward their maximum per reverse step.
  """
  scale: float = 1.0
  num_steps: int = 3

  def __post_init__(self):
    if not self.scale > 0:
      raise ValueError(f"classifier guidance scale must be > 0, got {self.scale}")
    if self.num_steps < 1:
      raise ValueError(f"classifier guidance num_steps must be >= 1, got {self.num_steps}")


@flax.struct.dataclass
class ClassifierGuide:
  """The reverse-step update of classifier guidance (see the module docstring), as a pytree.

  Calling it, guide(mean, posterior_var, s, free), returns the guided mean; only free positions
  move.

  Attributes:
    target_log_prob_fn: log p(c | z_s, s); its arrays are the guide's leaves.
    settings: scale and iterations (static).
  """
  target_log_prob_fn: TargetLogProbFn
  settings: ClassifierGuidance = flax.struct.field(pytree_node=False)

  def __call__(self, mean_BLD, posterior_var, s_B, free_BL):
    grad_fn = jax.grad(lambda z_BLD: self.target_log_prob_fn(z_BLD, s_B).sum())

    def refine(_, z_BLD):
      return mean_BLD + jnp.where(free_BL[..., None], self.settings.scale * posterior_var * grad_fn(z_BLD), 0.0)

    return jax.lax.fori_loop(0, self.settings.num_steps, refine, mean_BLD)


def classifier_guidance(target_log_prob_fn: TargetLogProbFn, settings: ClassifierGuidance) -> ClassifierGuide:
  """The guide that steers a Gaussian sampler toward high `target_log_prob_fn` (pass it as guide_fn)."""
  return ClassifierGuide(target_log_prob_fn=target_log_prob_fn, settings=settings)
