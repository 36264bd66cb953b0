"""Closed-form checks of the masked (absorbing) process and its NELBO."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm_jax import schedules
from ddlm_jax import testing
from ddlm_jax.processes import base
from ddlm_jax.processes import masked

MASK_ID = 0
TOKENS = (1, 2, 3)


@pytest.mark.parametrize("kind", schedules.SCHEDULES)
@pytest.mark.parametrize("t", [0.05, 0.3, 0.7, 0.95])
def test_masking_marginal_matches_one_minus_alpha(kind, t):
  process = masked.MaskedDiffusion(vocab_size=4, mask_id=MASK_ID, schedule=schedules.Schedule(kind))
  x0_BL = jnp.full((400, 250), 2, jnp.int32)
  xt_BL = process.corrupt(x0_BL, jnp.full((400,), t), jax.random.key(1))
  expected = float(process.schedule.mask_prob(t))
  n = x0_BL.size
  tolerance = 5 * np.sqrt(expected * (1 - expected) / n)
  assert abs(float((xt_BL == MASK_ID).mean()) - expected) < tolerance
  assert bool(((xt_BL == MASK_ID) | (xt_BL == 2)).all())


@pytest.mark.parametrize("kind", schedules.SCHEDULES)
def test_loss_weight_is_minus_alpha_prime_over_one_minus_alpha(kind):
  schedule = schedules.Schedule(kind)
  t = jnp.linspace(0.01, 1.0, 50)
  alpha_prime = jax.vmap(jax.grad(schedule.alpha))(t)
  np.testing.assert_allclose(schedule.alpha_prime(t), alpha_prime, rtol=1e-5)
  np.testing.assert_allclose(schedule.loss_weight(t), -alpha_prime / (1 - schedule.alpha(t)), rtol=1e-3)
  assert float(schedule.alpha(0.0)) == 1.0
  np.testing.assert_allclose(schedule.alpha(1.0), schedule.final_alpha, atol=1e-7)


def test_linear_weight_is_one_over_t():
  t = jnp.array([0.01, 0.25, 0.5, 1.0])
  np.testing.assert_allclose(schedules.Schedule("linear").loss_weight(t), 1 / t, rtol=1e-6)
  np.testing.assert_allclose(schedules.Schedule("loglinear").loss_weight(t), 1 / t, rtol=1e-6)


def test_antithetic_times_are_stratified():
  t_B = base.sample_times(jax.random.key(3), 64, antithetic=True)
  counts = np.histogram(np.asarray(t_B), bins=64, range=(0, 1))[0]
  assert (counts == 1).all()


def _perfect_nelbo_check(dist, x0_BL, prompt_mask_BL, expected_nats_B, kind="linear"):
  process = masked.MaskedDiffusion(vocab_size=4, mask_id=MASK_ID, schedule=schedules.Schedule(kind))
  model_fn = testing.exact_masked_denoiser(dist, 4, MASK_ID)
  draws = 4000
  x0_NL = jnp.tile(x0_BL, (draws, 1))
  prompt_NL = None if prompt_mask_BL is None else jnp.tile(prompt_mask_BL, (draws, 1))
  estimate = jax.jit(lambda key: process.nelbo(model_fn, x0_NL, key, prompt_NL))(jax.random.key(0))
  nats_DB = np.asarray(estimate.nats_B).reshape(draws, len(x0_BL))
  mean_B, stderr_B = nats_DB.mean(0), nats_DB.std(0) / np.sqrt(draws)
  assert (np.abs(mean_B - expected_nats_B) < 4 * stderr_B + 1e-3).all(), (mean_B, expected_nats_B, stderr_B)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_nelbo_of_perfect_denoiser_equals_true_nll(kind):
  dist = testing.TinyDistribution.random(TOKENS, length=3, seed=0)
  x0_BL = dist.sample(5, seed=1)
  _perfect_nelbo_check(dist, jnp.asarray(x0_BL), None, -dist.log_prob(x0_BL), kind)


def test_sft_nelbo_of_perfect_denoiser_equals_conditional_nll():
  dist = testing.TinyDistribution.random(TOKENS, length=3, seed=2)
  x0_BL = dist.sample(4, seed=3)
  prompt_BL = np.zeros_like(x0_BL, bool)
  prompt_BL[:, 0] = True
  seqs, log_p = dist.sequences_SL, dist.log_probs_S
  log_prompt_B = np.array([np.logaddexp.reduce(log_p[seqs[:, 0] == x[0]]) for x in x0_BL])
  expected_B = -(dist.log_prob(x0_BL) - log_prompt_B)
  _perfect_nelbo_check(dist, jnp.asarray(x0_BL), jnp.asarray(prompt_BL), expected_B)


def test_sft_never_masks_or_scores_the_prompt():
  process = masked.MaskedDiffusion(vocab_size=4, mask_id=MASK_ID)
  x0_BL = jnp.tile(jnp.array([[1, 2, 3, 1, 2, 3]]), (512, 1))
  prompt_BL = jnp.arange(6)[None, :] < jnp.arange(512)[:, None] % 6
  xt_BL = process.corrupt(x0_BL, jnp.full((512,), 1.0), jax.random.key(0), keep_BL=prompt_BL)
  assert bool((xt_BL[prompt_BL] == x0_BL[prompt_BL]).all())
  assert bool((xt_BL[~prompt_BL] == MASK_ID).all())
  estimate = process.nelbo(lambda x, t: jnp.zeros(x.shape + (4,)), x0_BL, jax.random.key(1), prompt_BL)
  np.testing.assert_array_equal(estimate.num_tokens_B, (~prompt_BL).sum(1))


def test_loglinear_prior_term_and_prior_draw_agree():
  process = masked.MaskedDiffusion(vocab_size=9, mask_id=4, schedule=schedules.Schedule("loglinear", eps=0.2))
  np.testing.assert_allclose(process.prior_nats_per_token(), 0.2 * np.log(8), rtol=1e-6)
  fixed_BL = jnp.zeros((200, 100), bool)
  canvas_BL = process.initial_state(None, jnp.zeros((200, 100), jnp.int32), fixed_BL,
                                    jax.random.split(jax.random.key(2), 200)).tokens_BL
  clean = np.asarray(canvas_BL != 4)
  assert abs(clean.mean() - 0.2) < 5 * np.sqrt(0.2 * 0.8 / clean.size)
  counts = np.bincount(np.asarray(canvas_BL)[clean], minlength=9)
  assert counts[4] == 0 and (counts[[0, 1, 2, 3, 5, 6, 7, 8]] > 0.1 * clean.sum() / 8).all()


def test_bad_mask_id_is_rejected():
  with pytest.raises(ValueError, match="mask_id"):
    masked.MaskedDiffusion(vocab_size=4, mask_id=4)
  with pytest.raises(ValueError, match="schedule kind"):
    schedules.Schedule("quadratic")
