"""Invariants of the scan sampler, and exactness with a perfect denoiser."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm_jax import samplers
from ddlm_jax import schedules
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


@pytest.mark.parametrize("strategy", samplers.TOKEN_STRATEGIES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_prompt_fixed_and_nothing_left_masked(strategy, temperature):
  config = samplers.SamplerConfig(steps=8, strategy=strategy, temperature=temperature)
  tokens_BL, fixed_BL = prompts(4, 16, [0, 3, 7, 15])
  out_BL = samplers.sample(random_logits_model(), PROCESS, config, tokens_BL, fixed_BL, jax.random.key(0))
  np.testing.assert_array_equal(out_BL[fixed_BL], tokens_BL[fixed_BL])
  assert not bool((out_BL == MASK_ID).any())


def plan_for(config, fixed_BL):
  return samplers.make_plan(config, ~fixed_BL, jnp.zeros((fixed_BL.shape[0],), jnp.uint32))


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
  plan = plan_for(config, fixed_BL)
  np.testing.assert_array_equal(revealed_SB, np.asarray(plan.reveal_counts_BS).T)
  np.testing.assert_array_equal(np.asarray(plan.reveal_counts_BS).sum(1), (~np.asarray(fixed_BL)).sum(1))
  assert (revealed_SB >= 1).all()  # no step is wasted, even with a prompt
  if block_length:  # block j is complete before block j + 1 starts
    for step in range(config.steps):
      later_BL = np.asarray(plan.block_BL) > np.asarray(plan.block_of_step_BS)[:, step, None]
      assert (np.asarray(trajectory_SBL[step])[later_BL] == MASK_ID).all()


def llada_transfer_counts(block_size, steps_per_block):
  """LLaDA's schedule, written independently: equal shares, the remainder to the first steps."""
  base, remainder = divmod(block_size, steps_per_block)
  return [base + (i < remainder) for i in range(steps_per_block)]


@pytest.mark.parametrize("prompt_len,block_length,steps", [(0, 0, 5), (3, 0, 7), (4, 8, 9), (6, 4, 12)])
def test_reveal_schedule_matches_llada(prompt_len, block_length, steps):
  length = prompt_len + 24  # 24 positions to generate after the prompt
  config = samplers.SamplerConfig(steps=steps, block_length=block_length)
  _, fixed_BL = prompts(1, length, [prompt_len])
  num_blocks = 24 // block_length if block_length else 1
  expected = sum((llada_transfer_counts(24 // num_blocks, steps // num_blocks) for _ in range(num_blocks)), [])
  np.testing.assert_array_equal(plan_for(config, fixed_BL).reveal_counts_BS[0], expected)


def test_k_strategies_under_a_loglinear_prior_keep_the_schedule():
  process = masked.MaskedDiffusion(vocab_size=VOCAB, mask_id=MASK_ID,
                                   schedule=schedules.Schedule("loglinear", eps=0.3))
  config = samplers.SamplerConfig(steps=4, strategy="random", record_trajectory=True)
  tokens_BL, fixed_BL = prompts(4, 16, [0, 0, 2, 2])
  out_BL, trajectory_SBL = samplers.sample(random_logits_model(), process, config, tokens_BL, fixed_BL,
                                           jax.random.key(4))
  assert not bool((out_BL == MASK_ID).any())
  masked_after_SB = np.asarray((trajectory_SBL == MASK_ID).sum(-1))
  # About 30% of the canvas starts clean; the schedule spreads the rest over all steps, so every
  # step reveals something (counts taken from ~fixed would run out before the last step).
  assert (np.diff(masked_after_SB, axis=0) < 0).all() and (masked_after_SB[-1] == 0).all()


def test_low_confidence_reveals_the_most_confident_positions():
  config = samplers.SamplerConfig(steps=4, strategy="low_confidence", temperature=0.0, record_trajectory=True)
  tokens_BL, fixed_BL = prompts(2, 8, [0, 0])
  model_fn = random_logits_model(3)
  _, trajectory_SBL = samplers.sample(model_fn, PROCESS, config, tokens_BL, fixed_BL, jax.random.key(0))
  canvas_BL = jnp.full((2, 8), MASK_ID)
  log_probs_BLV = PROCESS.x0_log_probs(model_fn(canvas_BL, jnp.ones(2)))
  confidence_BL = np.asarray(log_probs_BLV.max(-1))
  revealed_BL = np.asarray(trajectory_SBL[0] != MASK_ID)
  for row in range(2):
    assert set(np.argsort(-confidence_BL[row])[:2]) == set(np.flatnonzero(revealed_BL[row]))


@pytest.mark.parametrize("strategy", samplers.TOKEN_STRATEGIES)
def test_scan_matches_reference_python_loop(strategy):
  config = samplers.SamplerConfig(steps=6, strategy=strategy)
  tokens_BL, fixed_BL = prompts(3, 12, [0, 4, 6])
  model_fn = random_logits_model(1)
  key = jax.random.key(7)
  scanned_BL = jax.jit(lambda k: samplers.sample(model_fn, PROCESS, config, tokens_BL, fixed_BL, k))(key)
  row_keys_B = jax.vmap(lambda row: jax.random.fold_in(key, row))(jnp.arange(3))
  plan = samplers.make_plan(config, ~fixed_BL, row_keys_B)
  canvas_BL = jnp.where(fixed_BL, tokens_BL, MASK_ID)
  for step in range(config.steps):
    canvas_BL = samplers.sampler_step(model_fn, PROCESS, config, plan, canvas_BL, jnp.asarray(step))
  np.testing.assert_array_equal(scanned_BL, canvas_BL)


@pytest.mark.parametrize("strategy", samplers.TOKEN_STRATEGIES)
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
  with pytest.raises(ValueError, match="fewer than"):
    samplers.SamplerConfig(steps=3, block_length=4).max_blocks(16)


@pytest.mark.parametrize("strategy", ["random", "low_confidence"])
def test_gathering_the_block_changes_nothing_but_the_cost(strategy):
  """One block as long as the canvas takes the gathered path; no blocks takes the plain one."""
  tokens_BL, fixed_BL = prompts(3, 16, [0, 3, 9])
  outputs = [samplers.sample(random_logits_model(5), PROCESS,
                             samplers.SamplerConfig(steps=8, strategy=strategy, block_length=block_length),
                             tokens_BL, fixed_BL, jax.random.key(6))
             for block_length in (0, 16)]
  np.testing.assert_array_equal(outputs[0], outputs[1])
