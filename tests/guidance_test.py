"""Classifier-free and classifier guidance: the mixing rule, the sampler paths, a pure import."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm_jax import control
from ddlm_jax import guidance
from ddlm_jax import samplers
from ddlm_jax import schedules
from ddlm_jax.networks import classifier
from ddlm_jax.processes import gaussian
from ddlm_jax.processes import masked

sys.path.insert(0, "tests")
from gaussian_test import _process, _table, exact_denoiser, V, D  # noqa: E402

W, L, NULL = 12, 6, 0


def conditional_logits_fn(x_BL, t_B):
  """A test double whose logits depend on the condition (position 0) and the canvas."""
  del t_B
  hot_BLW = jax.nn.one_hot(x_BL, W)
  return 3.0 * hot_BLW[:, :1] + jnp.roll(hot_BLW, 1, axis=1)


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5])
def test_cfg_mixes_conditional_and_unconditional_outputs(scale):
  x_BL = jax.random.randint(jax.random.key(0), (3, L), 1, W)
  condition_BL = jnp.zeros((3, L), bool).at[:, 0].set(True)
  guided = guidance.classifier_free(conditional_logits_fn, condition_BL, NULL, scale)(x_BL, jnp.ones(3))
  cond = conditional_logits_fn(x_BL, None)
  uncond = conditional_logits_fn(x_BL.at[:, 0].set(NULL), None)
  expected = {0.0: uncond, 1.0: cond}.get(scale, uncond + scale * (cond - uncond))
  np.testing.assert_allclose(guided, expected, atol=1e-6)
  assert not np.allclose(cond, uncond)  # the double does depend on its condition


def test_cfg_on_embeddings_drops_the_condition_to_the_null_embedding():
  z_BLD = jax.random.normal(jax.random.key(1), (2, L, D))
  condition_BL = jnp.zeros((2, L), bool).at[:, :2].set(True)
  null_D = jnp.full((D,), 7.0)
  seen = []
  guided = guidance.classifier_free(lambda z, t: seen.append(z) or z, condition_BL, null_D, 0.0)(z_BLD, jnp.ones(2))
  np.testing.assert_allclose(guided[:, :2], 7.0)  # scale 0: the unconditional branch
  np.testing.assert_allclose(guided[:, 2:], z_BLD[:, 2:])
  assert seen[0].shape == (4, L, D)  # one network call on both branches


def test_cfg_scale_0_samples_the_unconditional_model():
  """Masked sampler, same keys: guidance scale 0 on a conditioned canvas draws the same free
  tokens as scale 1 on the canvas whose condition is the null token."""
  process = masked.MaskedDiffusion(vocab_size=W, mask_id=1, schedule=schedules.Schedule("linear"))
  fixed_tokens_BL = jnp.zeros((4, L), jnp.int32).at[:, 0].set(jnp.array([3, 5, 7, 9]))
  fixed_BL = jnp.zeros((4, L), bool).at[:, 0].set(True)
  run = lambda scale, tokens_BL: samplers.sample(
      conditional_logits_fn, process, samplers.SamplerConfig(steps=6, strategy="ancestral", guidance_scale=scale),
      tokens_BL, fixed_BL, jax.random.key(2), condition_BL=fixed_BL, null_id=NULL)
  guided_BL = run(0.0, fixed_tokens_BL)
  unconditional_BL = run(1.0, fixed_tokens_BL.at[:, 0].set(NULL))
  conditional_BL = run(1.0, fixed_tokens_BL)
  np.testing.assert_array_equal(guided_BL[:, 1:], unconditional_BL[:, 1:])
  np.testing.assert_array_equal(guided_BL[:, 0], fixed_tokens_BL[:, 0])
  assert not np.array_equal(conditional_BL[:, 1:], unconditional_BL[:, 1:])


def test_guidance_needs_a_condition():
  process = masked.MaskedDiffusion(vocab_size=W, mask_id=1, schedule=schedules.Schedule("linear"))
  with pytest.raises(ValueError, match="condition"):
    samplers.sample(conditional_logits_fn, process, samplers.SamplerConfig(steps=2, strategy="ancestral",
                                                                           guidance_scale=2.0),
                    jnp.zeros((1, L), jnp.int32), jnp.zeros((1, L), bool), jax.random.key(0))
  with pytest.raises(ValueError, match="scale"):
    guidance.ClassifierGuidance(scale=0.0)


def class_log_prob_fn(process, table_VD, words):
  """A toy classifier: log P(every position's word is in `words` | z_s), from the exact word
  posterior of independent uniform words."""
  def target_log_prob_fn(z_BLD, s_B):
    log_posterior_BLV = process.word_log_posterior(z_BLD, s_B, table_VD)
    return jax.nn.logsumexp(log_posterior_BLV[..., jnp.array(words)], axis=-1).sum(-1)

  return target_log_prob_fn


def test_classifier_guidance_first_step_and_fixed_point():
  """One iteration is Dhariwal & Nichol's mu + gamma v grad log p(c | mu); many reach the maximum of
  log N(z; mu, v) + gamma log p(c | z), where z = mu + gamma v grad log p(c | z)."""
  process, table_VD = _process(), _table()
  log_prob_fn = class_log_prob_fn(process, table_VD, [0, 1])
  mean_BLD = jax.random.normal(jax.random.key(8), (8, 4, D))
  s_B, var, free_BL = jnp.full((8,), 0.3), 0.01, jnp.ones((8, 4), bool)
  grad_fn = jax.grad(lambda z_BLD: log_prob_fn(z_BLD, s_B).sum())
  one_step = guidance.classifier_guidance(log_prob_fn, guidance.ClassifierGuidance(scale=3.0, num_steps=1))
  np.testing.assert_allclose(one_step(mean_BLD, var, s_B, free_BL), mean_BLD + 3.0 * var * grad_fn(mean_BLD),
                             rtol=1e-5, atol=1e-6)
  converged = guidance.classifier_guidance(log_prob_fn, guidance.ClassifierGuidance(scale=3.0, num_steps=50))
  z_BLD = converged(mean_BLD, var, s_B, free_BL)
  np.testing.assert_allclose(z_BLD, mean_BLD + 3.0 * var * grad_fn(z_BLD), rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(z_BLD - mean_BLD).max()) > 1e-3  # it moved


def test_classifier_guidance_raises_the_classifier_log_prob():
  """Uniform words and the exact denoiser: unguided samples put 1/3 of positions in the target
  class {0, 1}; guided ones put more, and the guided step raises the classifier's log-prob."""
  process, table_VD = _process(), _table()
  model = gaussian.EmbeddingModel(exact_denoiser(process, table_VD), table_VD)
  log_prob_fn = class_log_prob_fn(process, table_VD, [0, 1])
  guide_fn = guidance.classifier_guidance(log_prob_fn, guidance.ClassifierGuidance(scale=2.0))
  mean_BLD = jax.random.normal(jax.random.key(3), (64, 4, D))
  s_B = jnp.full((64,), 0.3)
  var = process.posterior_coefficients(0.32, 0.3)[2]
  guided_BLD = guide_fn(mean_BLD, var, s_B, jnp.ones((64, 4), bool))
  assert float(log_prob_fn(guided_BLD, s_B).mean()) > float(log_prob_fn(mean_BLD, s_B).mean())

  config = samplers.SamplerConfig(steps=25, strategy="ancestral")
  shares = {}
  for name, fn in (("unguided", None), ("guided", guide_fn)):
    tokens_BL = jax.jit(lambda key: samplers.sample(model, process, config, jnp.zeros((256, 4), jnp.int32),
                                                    jnp.zeros((256, 4), bool), key, guide_fn=fn))(jax.random.key(4))
    shares[name] = float(np.isin(np.asarray(tokens_BL), [0, 1]).mean())
  print(f"share of positions in the target class: {shares}")
  assert abs(shares["unguided"] - 1 / 3) < 0.06  # 1024 positions: sd 0.015
  assert shares["guided"] > shares["unguided"] + 0.15


def test_guidance_never_moves_fixed_positions():
  process, table_VD = _process(), _table()
  guide_fn = guidance.classifier_guidance(class_log_prob_fn(process, table_VD, [0]), guidance.ClassifierGuidance())
  mean_BLD = jax.random.normal(jax.random.key(5), (2, 4, D))
  free_BL = jnp.array([[True, False, True, False]] * 2)
  guided_BLD = guide_fn(mean_BLD, 0.1, jnp.full((2,), 0.5), free_BL)
  np.testing.assert_array_equal(guided_BLD[:, 1::2], mean_BLD[:, 1::2])
  assert not np.allclose(guided_BLD[:, ::2], mean_BLD[:, ::2])


def test_classifier_learns_noisy_attributes():
  """Two attributes of uniform rows, the position-0 word mod 2 and the position-1 word mod 3 (unknown
  in a quarter of the rows), read from z_t: far above chance at small t, near it at t = 1."""
  process, table_VD = _process(), _table()
  rows_NL = np.random.default_rng(0).integers(0, V, (512, 4)).astype(np.int32)
  labels_NA = np.stack([rows_NL[:, 0] % 2, np.where(rows_NL[:, 2] % 4 == 0, -1, rows_NL[:, 1] % 3)], axis=1)
  config = classifier.ClassifierConfig(vocab_size=V, num_classes=(2, 3), max_len=4, num_layers=1, embed_dim=32,
                                       mlp_dim=64)
  graphdef, params = control.train_classifier(process, table_VD, rows_NL, labels_NA, config, num_steps=150,
                                              batch_size=64, learning_rate=3e-3)
  accuracy = {t: control.classifier_accuracy(graphdef, params, process, table_VD, rows_NL, labels_NA, t)
              for t in (0.05, 1.0)}
  log_prob_fn = control.attribute_log_prob_fn(graphdef, params, process, table_VD, {0: 1})
  z_NLD = process.corrupt(process.table(table_VD)[rows_NL], jnp.full((512,), 0.05), jax.random.key(7))
  predicted_one = np.asarray(log_prob_fn(z_NLD, jnp.full((512,), 0.05))) > np.log(0.5)
  assert (predicted_one == (labels_NA[:, 0] == 1)).mean() > 0.8  # the guidance target agrees
  print(f"classifier accuracy per attribute by t: {accuracy}")
  assert (accuracy[0.05] > [0.8, 0.6]).all() and (accuracy[1.0] < [0.65, 0.45]).all()


def test_sampling_imports_no_optimiser_or_network():
  """Guidance and the sampler are pure maths: importing them pulls in neither optax nor a network."""
  code = ("import sys, ddlm_jax.guidance, ddlm_jax.samplers; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] == 'optax' or m.startswith('ddlm_jax.networks')))")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  imported = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
  assert imported.stdout.strip() == "[]", imported.stdout
