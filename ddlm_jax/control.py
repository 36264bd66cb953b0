"""Training the classifiers that classifier guidance uses (Diffusion-LM, Li et al. 2022, Sec. 5.2).

  graphdef, params = train_classifier(process, embeddings_VD, rows_NL, labels_NA, config)
  log_prob_fn = attribute_log_prob_fn(graphdef, params, process, embeddings_VD, {0: riverside})
  guide_fn = guidance.classifier_guidance(log_prob_fn, guidance.ClassifierGuidance(scale=10.0))

The classifier (`networks/classifier.py`) judges noisy embeddings z_t, reading them through the
language model's word posterior p(w | z_t). The guidance itself (`guidance.py`) is pure; this
module holds what needs an optimiser and a network.
"""
from typing import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ddlm_jax import progress
from ddlm_jax.networks import classifier
from ddlm_jax.processes import gaussian


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
    num_steps, batch_size, learning_rate, seed: Adam training (with a progress bar).

  Returns:
    (graphdef, params) of the classifier.
  """
  graphdef, params = nnx.split(classifier.NoisyClassifier(config, rngs=nnx.Rngs(seed)), nnx.Param)
  optimizer = optax.adam(learning_rate)
  table_VD = process.table(embeddings_VD)

  def loss_fn(params, rows_BL, labels_BA, key):
    t_key, noise_key = jax.random.split(key)
    t_B = jax.random.uniform(t_key, rows_BL.shape[:1]) ** 2
    logits = _classify(graphdef, params, process, embeddings_VD,
                       process.corrupt(table_VD[rows_BL], t_B, noise_key), t_B)
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
  bar = progress.bar(num_steps, "classifier", "step")
  for i in range(num_steps):
    batch = rng.integers(0, len(rows_NL), batch_size)
    previous = params
    params, opt_state = step(params, opt_state, rows_NL[batch], labels_NA[batch], jax.random.fold_in(key, i))
    jax.block_until_ready(previous)  # at most two steps in flight, so the bar counts steps done
    bar.update(1)
  bar.close()
  return graphdef, params


@flax.struct.dataclass
class AttributeLogProb:
  """log p(every target | z_s, s) = sum over attributes a of log p_a(targets[a] | z_s, s) under a
  trained classifier, as a pytree: the parameters and embedding table are its leaves, so a guide
  built on it reuses a compiled sampler.

  Called as (z_s float32[B, L, D], s float32[B]) -> float32[B].

  Attributes:
    params, embeddings_VD: the classifier's parameters; the language model's embedding table.
    graphdef, process: the classifier's structure; the language model's Gaussian process.
    targets: ((attribute index, class index), ...).
  """
  params: nnx.State
  embeddings_VD: jax.Array
  graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)
  process: gaussian.GaussianDiffusion = flax.struct.field(pytree_node=False)
  targets: tuple[tuple[int, int], ...] = flax.struct.field(pytree_node=False)

  def __call__(self, z_BLD: jax.Array, s_B: jax.Array) -> jax.Array:
    logits = _classify(self.graphdef, self.params, self.process, self.embeddings_VD, z_BLD, s_B)
    return sum(jax.nn.log_softmax(logits[a], axis=-1)[:, c] for a, c in self.targets)


def attribute_log_prob_fn(graphdef: nnx.GraphDef, params: nnx.State, process: gaussian.GaussianDiffusion,
                          embeddings_VD: jax.Array, targets: Mapping[int, int]) -> AttributeLogProb:
  """The target log-prob of a trained classifier; `targets` maps attribute index -> class index."""
  return AttributeLogProb(params=params, embeddings_VD=embeddings_VD, graphdef=graphdef, process=process,
                          targets=tuple(sorted(targets.items())))


def classifier_accuracy(graphdef: nnx.GraphDef, params: nnx.State, process: gaussian.GaussianDiffusion,
                        embeddings_VD: jax.Array, rows_NL: np.ndarray, labels_NA: np.ndarray, t: float,
                        seed: int = 0) -> np.ndarray:
  """Per-attribute accuracy float[A] of a trained classifier on z_t ~ q(z_t | x_0) at time t
  (rows with label -1 left out)."""
  t_N = jnp.full((len(rows_NL),), t)
  zt_NLD = process.corrupt(process.table(embeddings_VD)[rows_NL], t_N, jax.random.key(seed))
  classify = jax.jit(lambda params, z_BLD, t_B: _classify(graphdef, params, process, embeddings_VD, z_BLD, t_B))
  logits = classify(params, zt_NLD, t_N)
  predicted_NA = np.stack([np.asarray(logits_NC).argmax(-1) for logits_NC in logits], axis=1)
  known_NA = labels_NA >= 0
  return ((predicted_NA == labels_NA) & known_NA).sum(0) / np.maximum(known_NA.sum(0), 1)


def _classify(graphdef: nnx.GraphDef, params: nnx.State, process: gaussian.GaussianDiffusion,
              embeddings_VD: jax.Array, z_BLD: jax.Array, t_B: jax.Array) -> tuple[jax.Array, ...]:
  """The classifier's logits per attribute on z_t float32[B, L, D], reading z_t through the word
  posterior p(w | z_t) of the language model's table."""
  word_probs_BLV = jnp.exp(process.word_log_posterior(z_BLD, t_B, embeddings_VD))
  return nnx.merge(graphdef, params)(word_probs_BLV, t_B)
