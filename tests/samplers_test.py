"""Invariants of the scan sampler, and exactness with a perfect denoiser."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm_jax import samplers
from ddlm_jax import schedules
from ddlm_jax import testing
from ddlm_jax.processes import autoregressive
from ddlm_jax.processes import base
from ddlm_jax.processes import d3pm
from ddlm_jax.processes import gaussian
from ddlm_jax.processes import masked
from ddlm_jax.processes import uniform

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
  return samplers.make_plan(config, ~fixed_BL)


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
  log_probs_BLV = PROCESS.denoiser_log_probs(model_fn(canvas_BL, jnp.ones(2)), canvas_BL, 1.0)
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
  plan = samplers.make_plan(config, ~fixed_BL)
  canvas = base.Canvas(jnp.where(fixed_BL, tokens_BL, MASK_ID), fixed_BL)
  for step in range(config.steps):
    t, s = samplers.step_times(config, step)
    keys_B = samplers.step_keys(row_keys_B, step)
    logits_BLW = model_fn(canvas.tokens_BL, jnp.full((3,), t))
    if strategy == "ancestral":
      canvas = PROCESS.reverse_step(canvas, logits_BLW, t, s, keys_B, config.step_settings)
    else:
      canvas = samplers.reveal_step(PROCESS, config, plan, canvas, logits_BLW, t, step, keys_B)
  np.testing.assert_array_equal(scanned_BL, canvas.tokens_BL)


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


def test_check_sampler_names_the_setting_a_process_cannot_use():
  d3pm_uniform = d3pm.D3PM(vocab_size=VOCAB, transition="uniform", num_steps=4)
  d3pm_absorbing = d3pm.D3PM(vocab_size=VOCAB, transition="absorbing", num_steps=4, mask_id=MASK_ID)
  gaussian_process = gaussian.GaussianDiffusion(vocab_size=VOCAB, latent_dim=4)
  baseline = autoregressive.Autoregressive(vocab_size=VOCAB, bos_id=2)
  rejected = [(uniform.UniformDiffusion(VOCAB), dict(strategy="low_confidence"), r"no \[MASK\] state"),
              (d3pm_uniform, dict(strategy="random"), r"no \[MASK\] state"),
              (PROCESS, dict(strategy="ddim"), "work on embeddings"),
              (PROCESS, dict(clamp=True), "work on embeddings"),
              (gaussian_process, dict(strategy="random"), "reveals tokens"),
              (baseline, dict(guidance_scale=2.0), "decodes left to right")]
  for process, settings, message in rejected:
    with pytest.raises(ValueError, match=message):
      samplers.check_sampler(process, samplers.SamplerConfig(**settings))
  for process, settings in [(d3pm_absorbing, dict(strategy="low_confidence")), (gaussian_process, dict(strategy="ddim")),
                            (baseline, dict(strategy="low_confidence")), (PROCESS, dict(guidance_scale=2.0))]:
    samplers.check_sampler(process, samplers.SamplerConfig(**settings))
  with pytest.raises(ValueError, match="classifier guidance work on embeddings"):
    samplers.check_sampler(PROCESS, samplers.SamplerConfig(), guide_fn=lambda *args: args[0])
  with pytest.raises(ValueError, match="condition_BL"):  # a sampler call needs the condition
    samplers.check_sampler(PROCESS, samplers.SamplerConfig(guidance_scale=2.0), null_id=PAD_ID, sampling=True)


@pytest.mark.parametrize("strategy", ["random", "low_confidence"])
def test_gathering_the_block_changes_nothing_but_the_cost(strategy):
  """One block as long as the canvas takes the gathered path; no blocks takes the plain one."""
  tokens_BL, fixed_BL = prompts(3, 16, [0, 3, 9])
  outputs = [samplers.sample(random_logits_model(5), PROCESS,
                             samplers.SamplerConfig(steps=8, strategy=strategy, block_length=block_length),
                             tokens_BL, fixed_BL, jax.random.key(6))
             for block_length in (0, 16)]
  np.testing.assert_array_equal(outputs[0], outputs[1])


def padded_corpus_model(text_length=3, length=8):
  """A network taught by a mostly padded corpus, with no sense of where it is on an all-[MASK]
  canvas: [PAD] is its likeliest token everywhere, [EOS] is likely at position `text_length`, and
  content (token 4 + position) is less likely than either."""
  position_L = jnp.arange(length)
  logits_LV = jnp.full((length, VOCAB), -5.0)
  logits_LV = logits_LV.at[:, PAD_ID].set(4.0).at[position_L, 4 + position_L].set(1.0)
  logits_LV = logits_LV.at[text_length, EOS_ID].set(3.0)
  return lambda xt_BL, t_B: jnp.broadcast_to(logits_LV, xt_BL.shape + (VOCAB,))


@pytest.mark.parametrize("block_length", [0, 4])
def test_low_confidence_reveals_no_end_ahead_of_the_text_it_ends(block_length):
  """Greedy low_confidence writes the text, then [EOS], then [PAD]s: a [PAD] only after an [EOS],
  and an end only once every position to its left is revealed (one reveal per step)."""
  config = samplers.SamplerConfig(steps=8, strategy="low_confidence", temperature=0.0, block_length=block_length,
                                  record_trajectory=True)
  tokens_BL, fixed_BL = jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), bool)
  out_BL, trajectory_SBL = samplers.sample(padded_corpus_model(), PROCESS, config, tokens_BL, fixed_BL,
                                           jax.random.key(0), eos_id=EOS_ID, pad_id=PAD_ID)
  np.testing.assert_array_equal(out_BL, [[4, 5, 6, EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID]])
  for canvas_L in np.asarray(trajectory_SBL[:, 0]):
    masked_L = canvas_L == MASK_ID
    ends_L = (canvas_L == EOS_ID) | (canvas_L == PAD_ID)
    assert not (ends_L & (np.cumsum(masked_L) > 0)).any(), canvas_L


def test_random_strategy_draws_ends_as_the_model_says():
  """'random' keeps drawing [PAD] where the model puts it (its positions do not depend on the draws)."""
  config = samplers.SamplerConfig(steps=8, strategy="random", temperature=0.0)
  out_BL = samplers.sample(padded_corpus_model(), PROCESS, config, jnp.zeros((1, 8), jnp.int32),
                           jnp.zeros((1, 8), bool), jax.random.key(0), eos_id=EOS_ID, pad_id=PAD_ID)
  np.testing.assert_array_equal(out_BL, np.full((1, 8), PAD_ID))


FACTORISED_PROBS_LV = np.array([[0.0, 0.0, 0.0, 0.0, 0.6, 0.3, 0.1] + [0.0] * (VOCAB - 7),
                                [0.0, 0.0, 0.0, 0.0, 0.2, 0.2, 0.6] + [0.0] * (VOCAB - 7)])


def factorised_exact_denoiser(xt_BL, t_B):
  """The exact p(x_0 | x_t) of two independent positions with the marginals FACTORISED_PROBS_LV."""
  del t_B
  log_probs_LV = jnp.log(jnp.asarray(FACTORISED_PROBS_LV, jnp.float32))
  return jnp.broadcast_to(log_probs_LV, xt_BL.shape + (VOCAB,))


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_masked_ancestral_sampling_with_exact_denoiser_is_exact_at_any_step_count(steps):
  """MDLM's ancestral sampler with the exact denoiser of a factorised distribution draws it exactly,
  whatever the number of steps: the total variation of the 9 outcomes over 6000 draws stays within
  what the sample size explains (expected about 0.02), and each step reveals a share
  (alpha_s - alpha_t) / (1 - alpha_t) of the positions still masked (5 binomial standard errors)."""
  process = masked.MaskedDiffusion(vocab_size=VOCAB, mask_id=MASK_ID, schedule=schedules.Schedule("cosine"))
  config = samplers.SamplerConfig(steps=steps, strategy="ancestral", record_trajectory=True)
  num = 6000
  out_NL, trajectory_SNL = jax.jit(lambda key: samplers.sample(
      factorised_exact_denoiser, process, config, jnp.zeros((num, 2), jnp.int32), jnp.zeros((num, 2), bool),
      key))(jax.random.key(3))
  outcomes = [(a, b) for a in (4, 5, 6) for b in (4, 5, 6)]
  counts = collections.Counter(map(tuple, np.asarray(out_NL).tolist()))
  assert sum(counts[outcome] for outcome in outcomes) == num
  empirical = np.array([counts[outcome] / num for outcome in outcomes])
  expected = np.array([FACTORISED_PROBS_LV[0, a] * FACTORISED_PROBS_LV[1, b] for a, b in outcomes])
  total_variation = 0.5 * np.abs(empirical - expected).sum()
  assert total_variation < 3 * 0.5 * np.sqrt(expected * (1 - expected) / num).sum(), total_variation
  masked_SN = np.concatenate([np.full((1, num * 2), True),
                              np.asarray(trajectory_SNL == MASK_ID).reshape(steps, -1)])
  for step in range(steps):
    t, s = 1 - step / steps, 1 - (step + 1) / steps
    alpha_t, alpha_s = (float(process.schedule.alpha(time)) for time in (t, s))
    share = (alpha_s - alpha_t) / (1 - alpha_t)
    still_masked = masked_SN[step].sum()
    revealed_share = (masked_SN[step] & ~masked_SN[step + 1]).sum() / still_masked
    assert abs(revealed_share - share) < 5 * np.sqrt(share * (1 - share) / still_masked) + 1e-6, (step, share)
