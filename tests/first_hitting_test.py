"""The first-hitting sampler (strategy 'first_hitting'): exact in distribution, one network call per
revealed token, reveal times of the masked process's law, its settings, and the user's path."""
import collections
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import pipeline_test  # its untrained tiny Pipeline (tests/ is on the path of a pytest run)
from ddlm_jax import experiment
from ddlm_jax import samplers
from ddlm_jax import schedules
from ddlm_jax.processes import d3pm
from ddlm_jax.processes import gaussian
from ddlm_jax.processes import masked
from ddlm_jax.processes import uniform
from experiments import mdlm_tiny

VOCAB, MASK_ID, EOS_ID, PAD_ID = 4, 3, 1, 0  # tokens 0, 1, 2 and [MASK] last
PROCESS = masked.MaskedDiffusion(vocab_size=VOCAB, mask_id=MASK_ID)


def first_hitting(**settings) -> samplers.SamplerConfig:
  return samplers.SamplerConfig(strategy="first_hitting", **settings)


def canvas_table(length: int, seed: int = 0) -> np.ndarray:
  """float32[V ** L, L, V]: a network's logits for every canvas (row sum_l x^l V^l)."""
  return 2.0 * np.asarray(jax.random.normal(jax.random.key(seed), (VOCAB ** length, length, VOCAB)))


def table_model(table_CLV: np.ndarray):
  """A time-independent model_fn that looks its logits up by the whole canvas."""
  length = table_CLV.shape[1]

  def model_fn(xt_BL, t_B):
    del t_B
    return jnp.asarray(table_CLV)[(xt_BL * VOCAB ** jnp.arange(length)).sum(axis=1)]

  return model_fn


def time_conditioned_model():
  """A model_fn whose logits depend on the whole canvas and on t."""
  table_VV = jax.random.normal(jax.random.key(7), (VOCAB, VOCAB)) * 2.0
  return lambda xt_BL, t_B: table_VV[xt_BL] + table_VV[xt_BL].mean(axis=1, keepdims=True) + t_B[:, None, None]


def reveal_order_distribution(table_CLV: np.ndarray, orders, temperature: float) -> dict:
  """{sequence: probability} of revealing the positions in one of `orders` (equally likely), each
  token drawn from the table's softmax(logits / temperature) without [MASK] at the canvas so far."""
  length = table_CLV.shape[1]
  probs = collections.defaultdict(float)
  for order in orders:
    for tokens in itertools.product(range(MASK_ID), repeat=length):
      canvas, prob = [MASK_ID] * length, 1.0 / len(orders)
      for position in order:
        logits_V = table_CLV[sum(x * VOCAB ** l for l, x in enumerate(canvas)), position, :MASK_ID] / temperature
        prob *= np.exp(logits_V[tokens[position]] - np.logaddexp.reduce(logits_V))
        canvas[position] = tokens[position]
      probs[tokens] += prob
  return probs


def total_variation(p: dict, q: dict) -> float:
  return 0.5 * sum(abs(p.get(x, 0.0) - q.get(x, 0.0)) for x in set(p) | set(q))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_samples_follow_the_exact_reverse_process_distribution(temperature):
  length, num = 3, 20_000
  table_CLV = canvas_table(length)
  exact = reveal_order_distribution(table_CLV, list(itertools.permutations(range(length))), temperature)
  out_NL = jax.jit(lambda key: samplers.sample(
      table_model(table_CLV), PROCESS, first_hitting(temperature=temperature),
      jnp.zeros((num, length), jnp.int32), jnp.zeros((num, length), bool), key))(jax.random.key(0))
  counts = collections.Counter(map(tuple, np.asarray(out_NL).tolist()))
  empirical = {tokens: count / num for tokens, count in counts.items()}
  # K outcomes: E[TV] <= 1/2 sum_k sqrt(p_k / N) <= 1/2 sqrt(K / N) (Jensen, Cauchy-Schwarz); one
  # sample moves TV by <= 1/N, so P(TV > E[TV] + sqrt(log(1/delta) / 2N)) <= delta (McDiarmid).
  num_outcomes, delta = MASK_ID ** length, 1e-4
  bound = 0.5 * math.sqrt(num_outcomes / num) + math.sqrt(math.log(1 / delta) / (2 * num))  # 0.034
  assert total_variation(empirical, exact) < bound, (total_variation(empirical, exact), bound)
  # The test can tell a fixed (left-to-right) reveal order apart from the exact process.
  left_to_right = reveal_order_distribution(table_CLV, [tuple(range(length))], temperature)
  assert total_variation(left_to_right, exact) > 3 * bound


def test_one_network_call_per_revealed_token():
  """Each call reveals exactly one token of every row that has a masked free position, and the
  loop stops when none has: as many calls as the most free positions of a row."""
  length, calls, counted_model_fn = 10, [], time_conditioned_model()

  def model_fn(xt_BL, t_B):
    jax.debug.callback(lambda t: calls.append(len(t)), t_B)
    return counted_model_fn(xt_BL, t_B)

  free_BL = jnp.zeros((4, length), bool)
  free_BL = free_BL.at[0, jnp.array([1, 4, 5, 9])].set(True).at[1, jnp.array([0, 7])].set(True)
  free_BL = free_BL.at[2, 3].set(True)  # row 3 is all prompt
  fixed_tokens_BL = jax.random.randint(jax.random.key(1), (4, length), 0, MASK_ID)
  run = jax.jit(lambda key: samplers.sample(model_fn, PROCESS, first_hitting(record_trajectory=True),
                                            fixed_tokens_BL, ~free_BL, key))
  out_BL, trajectory_SBL = run(jax.random.key(2))
  jax.effects_barrier()
  assert calls == [4] * 4  # 4 = the most free positions of a row; each call sees the batch of 4
  assert trajectory_SBL.shape == (length, 4, length)
  masked_SB = np.asarray((trajectory_SBL == MASK_ID).sum(-1))
  free_B = np.asarray(free_BL.sum(-1))
  np.testing.assert_array_equal(masked_SB, np.maximum(free_B - 1 - np.arange(length)[:, None], 0))
  np.testing.assert_array_equal(trajectory_SBL[-1], out_BL)
  assert ((trajectory_SBL == MASK_ID) | (trajectory_SBL == out_BL)).all()  # a revealed token stays
  np.testing.assert_array_equal(out_BL[~free_BL], fixed_tokens_BL[~free_BL])


def test_reveal_times_follow_the_first_hitting_law():
  """From time t with n masked positions the next reveal is at m(tau) = m(t) u^(1/n): the ratios
  (m(tau_i) / m(tau_{i-1}))^(n - i) of a row's reveal times are independent U(0, 1) draws."""
  schedule = schedules.Schedule("cosine")
  process = masked.MaskedDiffusion(VOCAB, MASK_ID, schedule)
  length, num, times = 4, 2_000, []

  def model_fn(xt_BL, t_B):
    jax.debug.callback(lambda t: times.append(np.asarray(t)), t_B, ordered=True)
    return jnp.zeros(xt_BL.shape + (VOCAB,)) + t_B[:, None, None] * jnp.arange(VOCAB)

  jax.jit(lambda key: samplers.sample(model_fn, process, first_hitting(), jnp.zeros((num, length), jnp.int32),
                                      jnp.zeros((num, length), bool), key))(jax.random.key(3))
  jax.effects_barrier()
  times_SN = np.stack(times)
  assert times_SN.shape == (length, num)
  assert (np.diff(times_SN, axis=0) < 0).all() and (times_SN < 1).all()
  mask_prob_SN = np.asarray(schedule.mask_prob(jnp.asarray(np.concatenate([np.ones((1, num)), times_SN]))),
                            np.float64)
  for step in range(length):
    ratio_N = mask_prob_SN[step + 1] / mask_prob_SN[step]
    assert scipy.stats.kstest(ratio_N ** (length - step), "uniform").pvalue > 1e-3, step


@pytest.mark.parametrize("schedule", [schedules.Schedule(kind) for kind in schedules.SCHEDULES]
                         + [schedules.Schedule("loglinear", eps=0.3)], ids=str)
def test_time_at_mask_prob_inverts_mask_prob(schedule):
  t_N = jnp.linspace(0.0, 1.0, 201)
  np.testing.assert_allclose(schedule.time_at_mask_prob(schedule.mask_prob(t_N)), t_N, atol=2e-6)
  mask_prob_N = jnp.linspace(0.0, 1.0, 201) * schedule.mask_prob(1.0)
  np.testing.assert_allclose(schedule.mask_prob(schedule.time_at_mask_prob(mask_prob_N)), mask_prob_N,
                             rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_fixed_positions_never_change_and_rows_do_not_depend_on_their_batch(temperature):
  length = 12
  fixed_BL = jax.random.bernoulli(jax.random.key(4), 0.4, (5, length)).at[4].set(False)
  fixed_tokens_BL = jax.random.randint(jax.random.key(5), (5, length), 0, MASK_ID)
  schedule = schedules.Schedule("loglinear", eps=0.3)  # a prior that leaves some tokens clean
  process = masked.MaskedDiffusion(VOCAB, MASK_ID, schedule)
  model_fn = time_conditioned_model()
  config = first_hitting(temperature=temperature)
  out_BL = samplers.sample(model_fn, process, config, fixed_tokens_BL, fixed_BL, jax.random.key(6))
  np.testing.assert_array_equal(out_BL[fixed_BL], fixed_tokens_BL[fixed_BL])
  assert not bool((out_BL == MASK_ID).any())
  alone_BL = samplers.sample(model_fn, process, config, fixed_tokens_BL[2:3], fixed_BL[2:3], jax.random.key(6),
                             row_ids_B=jnp.array([2]))
  np.testing.assert_array_equal(out_BL[2:3], alone_BL)


def test_free_positions_after_eos_become_pad():
  always_eos = lambda xt_BL, t_B: jnp.where(jnp.arange(VOCAB) == EOS_ID, 5.0, 0.0) * jnp.ones(xt_BL.shape + (1,))
  fixed_BL = jnp.zeros((2, 5), bool).at[1, :2].set(True)
  fixed_tokens_BL = jnp.full((2, 5), 2)
  out_BL = samplers.sample(always_eos, PROCESS, first_hitting(temperature=0.0), fixed_tokens_BL, fixed_BL,
                           jax.random.key(0), eos_id=EOS_ID, pad_id=PAD_ID)
  np.testing.assert_array_equal(out_BL, [[EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID], [2, 2, EOS_ID, PAD_ID, PAD_ID]])


def test_settings_first_hitting_cannot_use_are_refused():
  with pytest.raises(ValueError, match="block_length needs strategy 'random' or 'low_confidence'"):
    first_hitting(block_length=4)
  others = [uniform.UniformDiffusion(VOCAB), d3pm.D3PM(VOCAB, "absorbing", num_steps=4, mask_id=MASK_ID)]
  refusal = r"'first_hitting' draws reveal times.*\(MaskedDiffusion\); \w+ takes 'ancestral'"
  for process in others:
    with pytest.raises(ValueError, match=refusal):
      samplers.check_sampler(process, first_hitting())
  with pytest.raises(ValueError, match="reveals tokens"):
    samplers.check_sampler(gaussian.GaussianDiffusion(vocab_size=VOCAB, latent_dim=4), first_hitting())
  samplers.check_sampler(PROCESS, first_hitting())


def test_generate_with_first_hitting_keeps_the_prompt():
  model = pipeline_test.untrained(pipeline_test.short_char_config(mdlm_tiny))
  prompts = ["ab", "c d"]
  texts, trajectory_SNL = model.generate(prompts, seed=5, strategy="first_hitting", record_trajectory=True)
  assert [text[:len(prompt)] for text, prompt in zip(texts, prompts)] == prompts
  assert trajectory_SNL.shape == (model.seq_len, 2, model.seq_len)
  masks_SN = (trajectory_SNL == model.tokenizer.mask_id).sum(-1)
  free_N = model.seq_len - np.array([2, 3])
  np.testing.assert_array_equal(masks_SN, np.maximum(free_N - 1 - np.arange(model.seq_len)[:, None], 0))
  assert texts == model.generate(prompts, seed=5, strategy="first_hitting")
  fixed_tokens_NL, fixed_NL = model._canvas(prompts, [{}, {}], model.seq_len)
  tokens_NL = jax.jit(lambda params, key: experiment.generate_tokens(
      model.graphdef, params, model.process, model._sampler_config(dict(strategy="first_hitting")),
      fixed_tokens_NL, fixed_NL, key, eos_id=model.tokenizer.eos_id, pad_id=model.tokenizer.pad_id))(
          model.params, jax.random.key(5))
  assert texts == [model.tokenizer.decode(row) for row in np.asarray(tokens_NL).tolist()]
