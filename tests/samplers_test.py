"""Invariants of the scan sampler, and exactness with a perfect denoiser."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm_jax import samplers
from ddlm_jax import testing
from ddlm_jax.processes import masked

MASK_ID, PAD_ID, EOS_ID = 1, 0, 3
VOCAB = 12


def random_logits_model(seed=0):
  """A fixed random 'network' whose logits depend on the whole canvas and on t."""
  table = jax.random.normal(jax.random.key(seed), (VOCAB, VOCAB)) * 2.0

  def model_fn(xt_BL, t_B):
    context_BV = table[xt_BL].mean(axis=1)
    return table[xt_BL] + context_BV[:, None, :] + t_B[:, None, None]

  return model_fn


def prompts(batch, length, prompt_lengths):
  fixed_BL = jnp.arange(length)[None, :] < jnp.asarray(prompt_lengths)[:, None]
  tokens_BL = jax.random.randint(jax.random.key(5), (batch, length), 4, VOCAB)
  return jnp.where(fixed_BL, tokens_BL, 0), fixed_BL


PROCESS = masked.MaskedDiffusion(vocab_size=VOCAB, mask_id=MASK_ID)


@pytest.mark.parametrize("strategy", samplers.STRATEGIES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_prompt_fixed_and_nothing_left_masked(strategy, temperature):
  config = samplers.SamplerConfig(steps=8, strategy=strategy, temperature=temperature)
  tokens_BL, fixed_BL = prompts(4, 16, [0, 3, 7, 15])
  out_BL = samplers.sample(random_logits_model(), PROCESS, config, tokens_BL, fixed_BL, jax.random.key(0))
  np.testing.assert_array_equal(out_BL[fixed_BL], tokens_BL[fixed_BL])
  assert not bool((out_BL == MASK_ID).any())


@pytest.mark.parametrize("strategy", ["random", "low_confidence"])
@pytest.mark.parametrize("block_length", [0, 4])
def test_k_strategies_reveal_exactly_the_schedule(strategy, block_length):
  config = samplers.SamplerConfig(steps=8, strategy=strategy, block_length=block_length,
                                  record_trajectory=True)
  tokens_BL, fixed_BL = prompts(3, 16, [0, 2, 5])
  out_BL, trajectory_SBL = samplers.sample(random_logits_model(), PROCESS, config, tokens_BL, fixed_BL,
                                           jax.random.key(1))
  masked_SB = np.asarray((trajectory_SBL == MASK_ID).sum(-1))
  masked_before_SB = np.concatenate([(~np.asarray(fixed_BL)).sum(-1)[None], masked_SB[:-1]])
  revealed_SB = masked_before_SB - masked_SB
  plan = samplers.make_plan(config, fixed_BL, jax.random.key(1), jnp.arange(3))
  np.testing.assert_array_equal(revealed_SB, np.asarray(plan.reveal_counts_BS).T)
  np.testing.assert_array_equal(np.asarray(plan.reveal_counts_BS).sum(1), (~np.asarray(fixed_BL)).sum(1))
  if block_length:  # block j is complete before block j + 1 starts
    for step in range(config.steps):
      block = step // (config.steps // config.num_blocks(16))
      later_BL = np.asarray(plan.block_BL) > block
      assert (np.asarray(trajectory_SBL[step])[later_BL] == MASK_ID).all()


def test_low_confidence_reveals_the_most_confident_positions():
  config = samplers.SamplerConfig(steps=4, strategy="low_confidence", temperature=0.0, record_trajectory=True)
  tokens_BL, fixed_BL = prompts(2, 8, [0, 0])
  model_fn = random_logits_model(3)
  _, trajectory_SBL = samplers.sample(model_fn, PROCESS, config, tokens_BL, fixed_BL, jax.random.key(0))
  canvas_BL = jnp.full((2, 8), MASK_ID)
  log_probs_BLV = masked.x0_log_probs(PROCESS, model_fn(canvas_BL, jnp.ones(2)))
  confidence_BL = np.asarray(log_probs_BLV.max(-1))
  revealed_BL = np.asarray(trajectory_SBL[0] != MASK_ID)
  for row in range(2):
    assert set(np.argsort(-confidence_BL[row])[:2]) == set(np.flatnonzero(revealed_BL[row]))


@pytest.mark.parametrize("strategy", samplers.STRATEGIES)
def test_scan_matches_reference_python_loop(strategy):
  config = samplers.SamplerConfig(steps=6, strategy=strategy)
  tokens_BL, fixed_BL = prompts(3, 12, [0, 4, 6])
  model_fn = random_logits_model(1)
  key = jax.random.key(7)
  scanned_BL = jax.jit(lambda k: samplers.sample(model_fn, PROCESS, config, tokens_BL, fixed_BL, k))(key)
  plan = samplers.make_plan(config, fixed_BL, key, jnp.arange(3))
  canvas_BL = jnp.where(fixed_BL, tokens_BL, MASK_ID)
  for step in range(config.steps):
    canvas_BL = samplers.sampler_step(model_fn, PROCESS, config, plan, canvas_BL, jnp.asarray(step))
  np.testing.assert_array_equal(scanned_BL, canvas_BL)


@pytest.mark.parametrize("strategy", samplers.STRATEGIES)
def test_a_row_does_not_depend_on_its_batch(strategy):
  config = samplers.SamplerConfig(steps=6, strategy=strategy)
  tokens_BL, fixed_BL = prompts(4, 12, [0, 2, 4, 6])
  model_fn = random_logits_model(2)
  key = jax.random.key(11)
  full_BL = samplers.sample(model_fn, PROCESS, config, tokens_BL, fixed_BL, key)
  alone_BL = samplers.sample(model_fn, PROCESS, config, tokens_BL[2:3], fixed_BL[2:3], key,
                             row_ids_B=jnp.array([2]))
  np.testing.assert_array_equal(full_BL[2:3], alone_BL)


def test_free_positions_after_eos_become_pad():
  tokens_BL = jnp.array([[5, EOS_ID, 6, 7, EOS_ID, 8], [5, 6, 7, 8, 9, 10]])
  fixed_BL = jnp.zeros((2, 6), bool).at[0, 3].set(True)
  out_BL = samplers.pad_after_eos(tokens_BL, fixed_BL, EOS_ID, PAD_ID)
  np.testing.assert_array_equal(out_BL, [[5, EOS_ID, PAD_ID, 7, PAD_ID, PAD_ID], [5, 6, 7, 8, 9, 10]])


def test_one_token_per_step_with_perfect_denoiser_samples_the_true_distribution():
  dist = testing.TinyDistribution.random((4, 5, 6), length=3, seed=4)
  model_fn = testing.exact_masked_denoiser(dist, VOCAB, MASK_ID)
  config = samplers.SamplerConfig(steps=3, strategy="random")
  num = 6000
  fixed_BL = jnp.zeros((num, 3), bool)
  out_BL = jax.jit(lambda k: samplers.sample(model_fn, PROCESS, config, jnp.zeros((num, 3), jnp.int32),
                                             fixed_BL, k))(jax.random.key(0))
  counts = collections.Counter(map(tuple, np.asarray(out_BL).tolist()))
  empirical = np.array([counts[tuple(s)] / num for s in dist.sequences_SL.tolist()])
  total_variation = 0.5 * np.abs(empirical - np.exp(dist.log_probs_S)).sum()
  # With 27 outcomes and 6000 draws the expected TV distance of a correct sampler is about 0.03.
  assert total_variation < 0.06, total_variation


def test_bad_sampler_settings_are_rejected():
  with pytest.raises(ValueError, match="steps"):
    samplers.SamplerConfig(steps=0)
  with pytest.raises(ValueError, match="strategy"):
    samplers.SamplerConfig(strategy="greedy")
  with pytest.raises(ValueError, match="multiple"):
    samplers.SamplerConfig(steps=5, block_length=4).num_blocks(16)
