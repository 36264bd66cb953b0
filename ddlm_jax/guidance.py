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
`train_classifier` fits such a classifier (`networks/classifier.py`), which reads z_t through the
language model's word posterior p(w | z_t), and `attribute_log_prob_fn` makes its target
log-prob; `samplers.sample` calls the update every step.
"""
import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ddlm_jax.networks import classifier
from ddlm_jax.processes import gaussian

# (z_s float32[B, L, D], s float32[B]) -> log p(target | z_s, s) float32[B]
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


def classifier_guidance(target_log_prob_fn: TargetLogProbFn, settings: ClassifierGuidance) -> GuideFn:
  """The reverse-step update of classifier guidance (see the module docstring).

  Returns:
    guide_fn(mean, posterior_var, s, free) -> the guided mean; only free positions move.
  """
  def guide_fn(mean_BLD, posterior_var, s_B, free_BL):
    grad_fn = jax.grad(lambda z_BLD: target_log_prob_fn(z_BLD, s_B).sum())

    def refine(_, z_BLD):
      return mean_BLD + jnp.where(free_BL[..., None], settings.scale * posterior_var * grad_fn(z_BLD), 0.0)

    return jax.lax.fori_loop(0, settings.num_steps, refine, mean_BLD)

  return guide_fn


def train_classifier(process: gaussian.GaussianDiffusion, embeddings_VD: jax.Array, rows_NL: np.ndarray,
                     labels_NA: np.ndarray, config: classifier.ClassifierConfig, *, num_steps: int = 500,
                     batch_size: int = 64, learning_rate: float = 1e-3,
                     seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
  """Trains a `classifier.NoisyClassifier` on z_t ~ q(z_t | x_0), read through the language
  model's (frozen) embedding table, so that it judges the z_t the sampler visits. Times are drawn
  as t = u^2, u ~ U[0, 1]: half of them below t = 1/4, where the words are still legible (at
  t = 1 nothing is, and a classifier there only learns the prior).

  Args:
    process: the Gaussian process of the language model.
    embeddings_VD: the language model's embedding table.
    rows_NL: int32[N, L] token rows.
    labels_NA: int32[N, A], class of each attribute; -1 where unknown (not scored).
    config: the classifier's sizes (config.num_classes has A entries).
    num_steps, batch_size, learning_rate, seed: Adam training.

  Returns:
    (graphdef, params) of the classifier.
  """
  graphdef, params = nnx.split(classifier.NoisyClassifier(config, rngs=nnx.Rngs(seed)), nnx.Param)
  classify = _noisy_text_classifier(graphdef, process, embeddings_VD)
  optimizer = optax.adam(learning_rate)
  table_VD = process.table(embeddings_VD)

  def loss_fn(params, rows_BL, labels_BA, key):
    t_key, noise_key = jax.random.split(key)
    t_B = jax.random.uniform(t_key, rows_BL.shape[:1]) ** 2
    logits = classify(params, process.corrupt(table_VD[rows_BL], t_B, noise_key), t_B)
    known_BA = labels_BA >= 0
    nll_BA = jnp.stack([optax.softmax_cross_entropy_with_integer_labels(logits_BC, jnp.maximum(labels_BA[:, a], 0))
                        for a, logits_BC in enumerate(logits)], axis=1)
    return jnp.where(known_BA, nll_BA, 0.0).sum() / jnp.maximum(known_BA.sum(), 1)

  @jax.jit
  def step(params, opt_state, rows_BL, labels_BA, key):
    grads = jax.grad(loss_fn)(params, rows_BL, labels_BA, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = optimizer.init(params)
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  for i in range(num_steps):
    batch = rng.integers(0, len(rows_NL), batch_size)
    params, opt_state = step(params, opt_state, rows_NL[batch], labels_NA[batch], jax.random.fold_in(key, i))
  return graphdef, params


def attribute_log_prob_fn(graphdef: nnx.GraphDef, params: nnx.State, process: gaussian.GaussianDiffusion,
                          embeddings_VD: jax.Array, targets: Mapping[int, int]) -> TargetLogProbFn:
  """log p(every target | z_s, s) = sum over attributes a of log p_a(targets[a] | z_s, s) under a
  trained classifier; `targets` maps attribute index -> class index."""
  classify = _noisy_text_classifier(graphdef, process, embeddings_VD)

  def target_log_prob_fn(z_BLD, s_B):
    logits = classify(params, z_BLD, s_B)
    return sum(jax.nn.log_softmax(logits[a], axis=-1)[:, c] for a, c in targets.items())

  return target_log_prob_fn


def classifier_accuracy(graphdef: nnx.GraphDef, params: nnx.State, process: gaussian.GaussianDiffusion,
                        embeddings_VD: jax.Array, rows_NL: np.ndarray, labels_NA: np.ndarray, t: float,
                        seed: int = 0) -> np.ndarray:
  """Per-attribute accuracy float[A] of a trained classifier on z_t ~ q(z_t | x_0) at time t
  (rows with label -1 left out)."""
  t_N = jnp.full((len(rows_NL),), t)
  zt_NLD = process.corrupt(process.table(embeddings_VD)[rows_NL], t_N, jax.random.key(seed))
  logits = jax.jit(_noisy_text_classifier(graphdef, process, embeddings_VD))(params, zt_NLD, t_N)
  predicted_NA = np.stack([np.asarray(logits_NC).argmax(-1) for logits_NC in logits], axis=1)
  known_NA = labels_NA >= 0
  return ((predicted_NA == labels_NA) & known_NA).sum(0) / np.maximum(known_NA.sum(0), 1)


def _noisy_text_classifier(graphdef: nnx.GraphDef, process: gaussian.GaussianDiffusion,
                           embeddings_VD: jax.Array) -> Callable:
  """(params, z_t float32[B, L, D], t float32[B]) -> the classifier's logits, reading z_t through
  the word posterior p(w | z_t) of the language model's table."""
  def classify(params, z_BLD, t_B):
    word_probs_BLV = jnp.exp(process.word_log_posterior(z_BLD, t_B, embeddings_VD))
    return nnx.merge(graphdef, params)(word_probs_BLV, t_B)

  return classify
