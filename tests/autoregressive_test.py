"""The autoregressive baseline: exact NLL, KV-cache decoding, and the token draws it uses."""
import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddlm_jax import samplers
from ddlm_jax import testing
from ddlm_jax.networks import transformer
from ddlm_jax.processes import autoregressive
from ddlm_jax.processes import base

PAD_ID, MASK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
VOCAB, WIDTH = 8, 10  # the network emits W > V logits, as with a padded vocabulary
PROCESS = autoregressive.Autoregressive(vocab_size=VOCAB, bos_id=BOS_ID, excluded_ids=(MASK_ID,))
DIST = testing.TinyDistribution.random((4, 5, 6), length=3, seed=4)


def exact_next_token_model(dist):
  """model_fn(inputs [BOS, x_0, ...], t) -> log p(x_l | x_<l) of `dist`, padded to WIDTH columns.

  The padding columns get huge logits: a process that does not drop them would be far off.
  """
  sequences_SL = jnp.asarray(dist.sequences_SL)
  log_probs_S = jnp.asarray(dist.log_probs_S, jnp.float32)
  one_hot_SLV = jax.nn.one_hot(sequences_SL, VOCAB, dtype=jnp.float32)

  def model_fn(inputs_BL, t_B):
    del t_B
    prefix_match_BSL = inputs_BL[:, None, 1:] == sequences_SL[None, :, :-1]
    agrees_BSL = jnp.cumprod(prefix_match_BSL, axis=-1) > 0  # sequence s agrees with x_<l+1
    consistent_BSL = jnp.pad(agrees_BSL, ((0, 0), (0, 0), (1, 0)), constant_values=True)  # ... with x_<l
    log_weights_BSL = jnp.where(consistent_BSL, log_probs_S[None, :, None], -jnp.inf)
    weights_BLS = jax.nn.softmax(log_weights_BSL, axis=1).transpose(0, 2, 1)
    log_probs_BLV = jnp.log(jnp.einsum("bls,slv->blv", weights_BLS, one_hot_SLV))
    return jnp.pad(log_probs_BLV, ((0, 0), (0, 0), (0, WIDTH - VOCAB)), constant_values=50.0)

  return model_fn


def prefix_log_prob(dist, x_BL, prompt_lengths_B):
  """log p(x_<k) with k = prompt_lengths_B[b], by summing the enumerated sequences."""
  probs_S = np.exp(dist.log_probs_S)
  return np.array([np.log(probs_S[(dist.sequences_SL[:, :k] == x_L[:k]).all(-1)].sum())
                   for x_L, k in zip(x_BL, prompt_lengths_B)])


def total_variation(samples_NL, probs_S, sequences_SL):
  counts = collections.Counter(map(tuple, np.asarray(samples_NL).tolist()))
  empirical_S = np.array([counts[tuple(s)] / len(samples_NL) for s in sequences_SL.tolist()])
  return 0.5 * np.abs(empirical_S - probs_S).sum()


# The process.

def test_inputs_are_the_targets_shifted_right_after_bos():
  x0_BL = jnp.array([[4, 5, 6, 3], [7, 3, 0, 0]])
  np.testing.assert_array_equal(PROCESS.inputs(x0_BL), [[BOS_ID, 4, 5, 6], [BOS_ID, 7, 3, 0]])


def test_next_token_log_probs_normalise_over_the_targets_only():
  logits_BLW = jax.random.normal(jax.random.key(0), (2, 3, WIDTH)) * 3.0
  log_probs_BLV = PROCESS.next_token_log_probs(logits_BLW)
  assert log_probs_BLV.shape == (2, 3, VOCAB)
  assert jnp.all(jnp.isneginf(log_probs_BLV[..., [BOS_ID, MASK_ID]]))
  np.testing.assert_allclose(jnp.exp(log_probs_BLV).sum(-1), 1.0, rtol=1e-6)


def test_token_ids_outside_the_vocabulary_are_rejected():
  with pytest.raises(ValueError, match="outside the vocabulary"):
    autoregressive.Autoregressive(vocab_size=VOCAB, bos_id=VOCAB)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    autoregressive.Autoregressive(vocab_size=VOCAB, bos_id=BOS_ID, excluded_ids=(-1,))


def test_exact_model_nll_is_minus_log_p_and_averages_to_the_entropy():
  model_fn = exact_next_token_model(DIST)
  nelbo = jax.jit(lambda x: PROCESS.nelbo(model_fn, x, jax.random.key(0)))
  every = nelbo(jnp.asarray(DIST.sequences_SL))
  np.testing.assert_allclose(every.nats_B, -DIST.log_probs_S, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(every.num_tokens_B, 3.0)

  nats_N = np.asarray(nelbo(jnp.asarray(DIST.sample(4000, seed=1))).nats_B)
  stderr = nats_N.std() / np.sqrt(len(nats_N))
  assert abs(nats_N.mean() - DIST.entropy_nats()) < 4 * stderr, (nats_N.mean(), DIST.entropy_nats(), stderr)


def test_prompt_positions_are_conditioned_on_but_not_scored():
  x0_BL = DIST.sample(6, seed=2)
  prompt_lengths_B = np.array([0, 1, 2, 3, 1, 2])
  prompt_mask_BL = np.arange(3)[None, :] < prompt_lengths_B[:, None]
  model_fn = exact_next_token_model(DIST)
  nelbo = jax.jit(lambda x_BL, prompt_BL: PROCESS.nelbo(model_fn, x_BL, jax.random.key(0), prompt_BL))(
      jnp.asarray(x0_BL), jnp.asarray(prompt_mask_BL))
  response_log_prob_B = DIST.log_prob(x0_BL) - prefix_log_prob(DIST, x0_BL, prompt_lengths_B)
  np.testing.assert_allclose(nelbo.nats_B, -response_log_prob_B, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(nelbo.num_tokens_B, 3 - prompt_lengths_B)


def test_loss_is_nats_per_scored_position():
  x0_BL = jnp.asarray(DIST.sample(5, seed=3))
  prompt_mask_BL = jnp.zeros((5, 3), bool).at[:2, 0].set(True)
  model_fn = exact_next_token_model(DIST)
  (loss, metrics), nelbo = jax.jit(lambda key: (PROCESS.loss(model_fn, x0_BL, key, prompt_mask_BL),
                                                PROCESS.nelbo(model_fn, x0_BL, key, prompt_mask_BL)))(
                                                    jax.random.key(0))
  np.testing.assert_allclose(loss, nelbo.nats_B.sum() / 13.0, rtol=1e-6)
  assert metrics["loss"] == loss


# Decoding with the exact model of a tiny distribution.

def decode_exact(config, fixed_tokens_BL, fixed_BL, key, prefill_length=0):
  batch_size, length = fixed_BL.shape
  cache, step_fn = samplers.recompute_decoder(exact_next_token_model(DIST), batch_size, length)
  return samplers.decode(step_fn, cache, PROCESS, config, fixed_tokens_BL, fixed_BL, key,
                         prefill_length=prefill_length)


def test_sampling_the_exact_model_reproduces_the_distribution():
  num = 6000
  fixed_BL = jnp.zeros((num, 3), bool)
  samples_NL = jax.jit(lambda key: decode_exact(samplers.SamplerConfig(), jnp.zeros((num, 3), jnp.int32),
                                                fixed_BL, key))(jax.random.key(0))
  # 27 outcomes, 6000 draws: an exact sampler's TV distance averages 0.022; its 99.99% quantile is 0.038.
  assert total_variation(samples_NL, np.exp(DIST.log_probs_S), DIST.sequences_SL) < 0.06


@pytest.mark.parametrize("prefill_length", [0, 1])
def test_a_fixed_first_token_gives_the_conditional_distribution(prefill_length):
  num, first = 4000, 5
  fixed_BL = jnp.zeros((num, 3), bool).at[:, 0].set(True)
  samples_NL = jax.jit(lambda key: decode_exact(samplers.SamplerConfig(), jnp.full((num, 3), first),
                                                fixed_BL, key, prefill_length))(jax.random.key(1))
  assert (np.asarray(samples_NL)[:, 0] == first).all()
  given_S = DIST.sequences_SL[:, 0] == first
  conditional_S = np.exp(DIST.log_probs_S[given_S]) / np.exp(DIST.log_probs_S[given_S]).sum()
  # 9 outcomes, 4000 draws: an exact sampler's TV distance averages 0.014; its 99.99% quantile is 0.035.
  assert total_variation(samples_NL, conditional_S, DIST.sequences_SL[given_S]) < 0.04


# Decoding a small causal transformer with its KV cache.

NET_VOCAB, LENGTH = 13, 12
NET_PROCESS = autoregressive.Autoregressive(vocab_size=NET_VOCAB, bos_id=BOS_ID, excluded_ids=(MASK_ID,))
NET_CONFIG = transformer.TransformerConfig(vocab_size=16, max_len=16, num_layers=2, num_heads=2,
                                           embed_dim=16, mlp_dim=32, causal=True)
GREEDY = samplers.SamplerConfig(temperature=0.0)
SAMPLED = samplers.SamplerConfig(temperature=1.5, top_k=4, top_p=0.95)


@pytest.fixture(scope="module")
def network():
  return nnx.split(transformer.Transformer(NET_CONFIG, rngs=nnx.Rngs(0)))


def prompts(prompt_lengths, seed=5):
  fixed_BL = np.arange(LENGTH)[None, :] < np.asarray(prompt_lengths)[:, None]
  tokens_BL = np.asarray(jax.random.randint(jax.random.key(seed), fixed_BL.shape, 4, NET_VOCAB))
  return jnp.asarray(np.where(fixed_BL, tokens_BL, PAD_ID)), jnp.asarray(fixed_BL)


@functools.cache
def network_decoder(graphdef, config, cached=True, prefill_length=0, eos_id=None):
  """Jitted samplers.decode of the network, with its KV cache or by recomputing the full forward
  (one compilation per setting and shape, shared by the tests)."""
  @jax.jit
  def run(params, fixed_tokens_BL, fixed_BL, key, row_ids_B):
    batch_size, length = fixed_BL.shape
    if cached:
      cache, step_fn = transformer.make_decoder(graphdef, params, batch_size, length)
    else:
      cache, step_fn = samplers.recompute_decoder(nnx.merge(graphdef, params), batch_size, length)
    return samplers.decode(step_fn, cache, NET_PROCESS, config, fixed_tokens_BL, fixed_BL, key, row_ids_B,
                           eos_id=eos_id, pad_id=PAD_ID, prefill_length=prefill_length)

  return run


def decode_network(network, config, fixed_tokens_BL, fixed_BL, key, row_ids_B=None, **settings):
  graphdef, params = network
  return network_decoder(graphdef, config, **settings)(params, fixed_tokens_BL, fixed_BL, key, row_ids_B)


@pytest.mark.parametrize("config", [GREEDY, SAMPLED])
def test_cached_decoding_gives_the_tokens_of_full_recompute_decoding(network, config):
  fixed_tokens_BL, fixed_BL = prompts([0, 3, 7, 11])
  key = jax.random.key(2)
  cached_BL = decode_network(network, config, fixed_tokens_BL, fixed_BL, key)
  recomputed_BL = decode_network(network, config, fixed_tokens_BL, fixed_BL, key, cached=False)
  np.testing.assert_array_equal(cached_BL, recomputed_BL)
  assert (np.asarray(cached_BL)[~np.asarray(fixed_BL)] < NET_VOCAB).all()


def test_top_k_decoding_draws_among_the_k_most_likely_continuations(network):
  fixed_tokens_BL, fixed_BL = prompts([0, 3, 7, 11])
  out_BL = decode_network(network, SAMPLED, fixed_tokens_BL, fixed_BL, jax.random.key(2))
  graphdef, params = network
  forward = jax.jit(lambda params, x_BL: NET_PROCESS.next_token_log_probs(nnx.merge(graphdef, params)(x_BL)))
  log_probs_BLV = forward(params, NET_PROCESS.inputs(out_BL))
  drawn_BL = base.token_log_likelihood(log_probs_BLV, out_BL)
  rank_BL = np.asarray((log_probs_BLV > drawn_BL[..., None]).sum(-1))
  free_BL = ~np.asarray(fixed_BL)
  assert (rank_BL[free_BL] < SAMPLED.top_k).all()
  assert len(set(rank_BL[free_BL])) > 1  # really a draw, not the argmax


def test_prefilling_the_common_prompt_changes_nothing(network):
  fixed_tokens_BL, fixed_BL = prompts([3, 5, 9, 4])
  prefill_length = samplers.fixed_prefix_length(fixed_BL)
  assert prefill_length == 3
  key = jax.random.key(3)
  np.testing.assert_array_equal(decode_network(network, SAMPLED, fixed_tokens_BL, fixed_BL, key),
                                decode_network(network, SAMPLED, fixed_tokens_BL, fixed_BL, key,
                                               prefill_length=prefill_length))


def test_fixed_positions_never_change_and_a_row_does_not_depend_on_its_batch(network):
  fixed_BL = jax.random.bernoulli(jax.random.key(4), 0.4, (4, LENGTH))  # constraints anywhere
  fixed_tokens_BL = jnp.where(fixed_BL, jax.random.randint(jax.random.key(5), (4, LENGTH), 4, NET_VOCAB), 0)
  key = jax.random.key(6)
  batch_BL = decode_network(network, SAMPLED, fixed_tokens_BL, fixed_BL, key)
  np.testing.assert_array_equal(batch_BL[fixed_BL], fixed_tokens_BL[fixed_BL])
  alone_BL = decode_network(network, SAMPLED, fixed_tokens_BL[2:3], fixed_BL[2:3], key,
                            row_ids_B=jnp.array([2]))
  np.testing.assert_array_equal(alone_BL, batch_BL[2:3])


def test_free_positions_after_eos_become_pad(network):
  fixed_tokens_BL, fixed_BL = prompts([2, 2, 0, 0])
  fixed_tokens_BL, fixed_BL = fixed_tokens_BL.at[:, 4].set(EOS_ID), fixed_BL.at[:, 4].set(True)
  out_BL = decode_network(network, SAMPLED, fixed_tokens_BL, fixed_BL, jax.random.key(7), eos_id=EOS_ID)
  np.testing.assert_array_equal(out_BL[:, 5:], PAD_ID)


@pytest.mark.parametrize("eos_positions,steps", [((2, 4), 5), ((2, 2), 3), ((None, 3), 8)])
def test_decoding_stops_once_every_row_has_drawn_its_eos(eos_positions, steps):
  """A model double whose row r draws [EOS] at eos_positions[r] (never for None): the loop feeds
  positions up to the last row's [EOS] only."""
  length, calls = 8, []

  def model_fn(inputs_BL, t_B):
    del t_B
    eos_BL = jnp.arange(length) == jnp.array([[-1 if p is None else p] for p in eos_positions])
    return jnp.where(eos_BL[..., None], jax.nn.one_hot(EOS_ID, WIDTH), jax.nn.one_hot(5, WIDTH)) * 20.0

  cache, step_fn = samplers.recompute_decoder(model_fn, 2, length)

  def counted_step_fn(tokens_BT, start, cache):
    jax.debug.callback(lambda: calls.append(1), ordered=True)
    return step_fn(tokens_BT, start, cache)

  fixed_BL = jnp.zeros((2, length), bool)
  out_BL = jax.jit(lambda key: samplers.decode(counted_step_fn, cache, PROCESS, SAMPLED, jnp.zeros((2, length), jnp.int32),
                                               fixed_BL, key, eos_id=EOS_ID, pad_id=PAD_ID))(jax.random.key(0))
  jax.effects_barrier()
  assert len(calls) == steps
  for row, position in enumerate(eos_positions):
    expected_L = np.full(length, 5)
    if position is not None:
      expected_L[position], expected_L[position + 1:] = EOS_ID, PAD_ID
    np.testing.assert_array_equal(out_BL[row], expected_L)


def test_bad_prefill_length_is_rejected():
  fixed_tokens_BL, fixed_BL = prompts([2, 3])
  with pytest.raises(ValueError, match="prefill_length"):
    samplers.decode(None, None, NET_PROCESS, SAMPLED, fixed_tokens_BL, fixed_BL, jax.random.key(0),
                    prefill_length=LENGTH)
  assert samplers.fixed_prefix_length(np.ones((2, LENGTH), bool)) == LENGTH - 1


# Token draws (base.TokenDraw), shared by every sampler.

def draws_BN(draw, log_probs_BV, num, seed=0):
  """num draws from each row of log_probs_BV, int32[B, num]."""
  @jax.jit
  def run(log_probs_BV):
    batch_size, vocab = log_probs_BV.shape
    log_probs_BNV = jnp.broadcast_to(log_probs_BV[:, None], (batch_size, num, vocab))
    return draw(log_probs_BNV, jax.random.uniform(jax.random.key(seed), log_probs_BNV.shape[:2]))

  return np.asarray(run(log_probs_BV))


def test_top_k_never_draws_outside_the_k_most_likely():
  log_probs_BV = jax.nn.log_softmax(jax.random.normal(jax.random.key(0), (6, 20)))
  tokens_BN = draws_BN(base.TokenDraw(temperature=1.5, top_k=4), log_probs_BV, 3000)
  top_BK = np.argsort(-np.asarray(log_probs_BV), axis=-1)[:, :4]
  for tokens_N, top_K in zip(tokens_BN, top_BK):
    assert set(tokens_N) == set(top_K)
  # Ties at the k-th value are all kept: [0.3, 0.2, 0.2, 0.2, 0.1] with k = 2 keeps the three 0.2s.
  tied_tokens = draws_BN(base.TokenDraw(top_k=2), jnp.log(jnp.array([[0.3, 0.2, 0.2, 0.2, 0.1]])), 2000)
  assert set(tied_tokens[0]) == {0, 1, 2, 3}


def random_distributions(num, vocab, seed):
  """probs float64[num, vocab] = counts / total with small integer counts: many ties, and every
  partial sum a multiple of 1 / total."""
  counts_BV = np.random.default_rng(seed).integers(0, 6, (num, vocab)).astype(np.float64)
  counts_BV[:, 0] += 1  # no all-zero row
  return counts_BV / counts_BV.sum(-1, keepdims=True), counts_BV.sum(-1)


def test_top_p_keeps_a_minimal_set_of_mass_at_least_p():
  probs_BV, totals_B = random_distributions(200, 12, seed=0)
  rng = np.random.default_rng(1)
  # p half-way between two multiples of 1 / total, so float32 rounding cannot decide the set.
  top_p_B = (rng.integers(0, totals_B) + 0.5) / totals_B
  for probs_V, top_p in zip(probs_BV, top_p_B):
    filtered_V = base.TokenDraw(top_p=float(top_p)).filter(jnp.log(probs_V)[None, None])[0, 0]
    kept_V = np.isfinite(np.asarray(filtered_V))
    mass = probs_V[kept_V].sum()
    least = probs_V[kept_V].min()
    assert mass >= top_p
    assert least > 0
    # Minimal: removing the least likely member (with its ties, which are kept together) drops below p.
    assert mass - probs_V[kept_V & (probs_V == least)].sum() < top_p
    assert not (~kept_V & (probs_V == least)).any()
    if (probs_V == least).sum() == 1:
      assert mass - least < top_p


def test_top_p_draws_only_from_the_nucleus():
  probs_BV, _ = random_distributions(4, 12, seed=2)
  log_probs_BV = jnp.log(jnp.asarray(probs_BV, jnp.float32))
  draw = base.TokenDraw(top_p=0.55)
  kept_BV = np.isfinite(np.asarray(draw.filter(log_probs_BV[:, None])))[:, 0]
  tokens_BN = draws_BN(draw, log_probs_BV, 3000)
  for tokens_N, kept_V in zip(tokens_BN, kept_BV):
    assert set(tokens_N) == set(np.flatnonzero(kept_V))


@pytest.mark.parametrize("settings, message", [
    (dict(top_k=0), "top_k must be >= 1"),
    (dict(top_k=-3), "top_k must be >= 1"),
    (dict(top_p=0.0), r"top_p must lie in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must lie in \(0, 1\]"),
    (dict(temperature=-0.1), "temperature must be >= 0"),
])
def test_bad_draw_settings_are_rejected(settings, message):
  with pytest.raises(ValueError, match=message):
    base.TokenDraw(**settings)
  with pytest.raises(ValueError, match=message):
    samplers.SamplerConfig(**settings)
