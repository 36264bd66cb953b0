"""Speculative diffusion decoding: exact in distribution, greedy-identical at temperature 0, every draft
accepted when the drafter is the AR model, and the settings it refuses."""
import collections
import functools
import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddlm_jax import samplers
from ddlm_jax.decoding import speculative
from ddlm_jax.networks import transformer
from ddlm_jax.processes import autoregressive
from ddlm_jax.processes import base
from ddlm_jax.processes import masked

import pipeline_test  # its untrained tiny Pipeline (tests/ is on the path of a pytest run)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import ar_tiny  # pylint: disable=g-import-not-at-top
from experiments import bd3lm_tiny  # pylint: disable=g-import-not-at-top
from experiments import mdlm_tiny  # pylint: disable=g-import-not-at-top

# A tiny vocabulary: tokens 0..3, then [BOS] and [MASK].
TOKENS, BOS_ID, MASK_ID = 4, 4, 5
VOCAB, LENGTH = 6, 4
AR_PROCESS = autoregressive.Autoregressive(vocab_size=VOCAB, bos_id=BOS_ID, excluded_ids=(MASK_ID,))
DRAFT_PROCESS = masked.MaskedDiffusion(vocab_size=VOCAB, mask_id=MASK_ID)
NUM_CODES = 4099  # the test doubles' table rows: a prime > VOCAB ** LENGTH


def prefix_codes(x_BL: jax.Array) -> jax.Array:
  """int32[B, L]: a code of every prefix x[:, :l + 1], distinct up to length LENGTH."""
  return jnp.cumsum(x_BL * VOCAB ** jnp.arange(x_BL.shape[1]), axis=1) % NUM_CODES


def table_ar_model(seed: int, scale: float = 1.5):
  """A causal test double: the logits at position l are a random table's entry for the inputs up to
  l, i.e. for the prefix x_{<l} (a different next-token distribution for every prefix)."""
  table_CV = jnp.asarray(scale * np.random.default_rng(seed).normal(size=(NUM_CODES, VOCAB)), jnp.float32)
  return lambda inputs_BL, t_B: table_CV[prefix_codes(inputs_BL)]


AR_MODEL = table_ar_model(seed=0)


def mismatched_drafter_model(seed: int = 1, noise: float = 2.0):
  """A bidirectional test double that differs from AR_MODEL: its logits at position l are AR_MODEL's
  for the canvas to the left of l (masks included) plus random noise indexed by the whole canvas,
  and it gives [BOS], which the AR model never emits, some mass."""
  noise_CLV = jnp.asarray(noise * np.random.default_rng(seed).normal(size=(NUM_CODES, LENGTH, VOCAB)),
                          jnp.float32)

  def model_fn(canvas_BL, t_B):
    whole_B = prefix_codes(canvas_BL)[:, -1]
    return AR_MODEL(AR_PROCESS.inputs(canvas_BL), t_B) + noise_CLV[whole_B]

  return model_fn


def exact_ar_distribution(draw: base.TokenDraw, fixed_tokens_L: np.ndarray, fixed_L: np.ndarray):
  """(sequences int[S, L], probs float64[S]): every canvas with the fixed positions in place and the
  probability that `samplers.decode` of AR_MODEL under `draw` gives it."""
  free = [range(TOKENS) if not is_fixed else [token] for token, is_fixed in zip(fixed_tokens_L, fixed_L)]
  sequences_SL = np.array(list(itertools.product(*free)), np.int32)
  log_p_SLV = draw.log_probs(AR_PROCESS.next_token_log_probs(
      AR_MODEL(AR_PROCESS.inputs(jnp.asarray(sequences_SL)), None)))
  log_p_SL = np.asarray(base.token_log_likelihood(log_p_SLV, jnp.asarray(sequences_SL)), np.float64)
  probs_S = np.exp(np.where(fixed_L, 0.0, log_p_SL).sum(axis=1))
  np.testing.assert_allclose(probs_S.sum(), 1.0, rtol=1e-5)
  return sequences_SL, probs_S


@functools.cache
def grouped_sampler(drafter, config, group_size: int):
  """Jitted speculative decoding of AR_MODEL in independent groups of `group_size` rows (a vmap over
  the groups): each group shares its positions, so a group of one row runs the rule alone."""
  def one_group(fixed_tokens_GL, fixed_GL, key):
    cache, step_fn = samplers.recompute_decoder(AR_MODEL, *fixed_GL.shape)
    return speculative.speculative_decode(step_fn, cache, AR_PROCESS, drafter, config, fixed_tokens_GL,
                                          fixed_GL, key)

  @functools.partial(jax.jit, static_argnums=3)
  def run(fixed_tokens_L, fixed_L, key, num_groups):
    broadcast = lambda x_L: jnp.broadcast_to(x_L, (group_size,) + x_L.shape)
    return jax.vmap(lambda key: one_group(broadcast(fixed_tokens_L), broadcast(fixed_L), key))(
        jax.random.split(key, num_groups))

  return run


def total_variation(samples_NL: np.ndarray, sequences_SL: np.ndarray, probs_S: np.ndarray) -> float:
  counts = collections.Counter(map(tuple, samples_NL.tolist()))
  assert set(counts) <= set(map(tuple, sequences_SL.tolist()))
  empirical_S = np.array([counts[tuple(s)] for s in sequences_SL.tolist()]) / len(samples_NL)
  return 0.5 * np.abs(empirical_S - probs_S).sum()


def total_variation_bound(probs_S: np.ndarray, num_samples: int, group_size: int,
                          failure: float = 1e-6) -> float:
  """A bound that an exact sampler's empirical TV exceeds with probability < `failure`:
  E[TV] <= 0.5 sum_s sqrt(p_s (1 - p_s) / N) (Jensen), plus McDiarmid's deviation for N / G
  independent groups, each moving the TV by at most G / N: sqrt(G log(1 / failure) / (2 N))."""
  mean_bound = 0.5 * np.sqrt(probs_S * (1 - probs_S) / num_samples).sum()
  return mean_bound + np.sqrt(group_size * np.log(1 / failure) / (2 * num_samples))


# (draw, gamma, k, fixed position or None, group size)
LOSSLESS_CASES = [
    (base.TokenDraw(), 3, 2, None, 1),  # the window always moved back to 0 (gamma + 1 = L)
    (base.TokenDraw(temperature=0.7, top_k=3), 2, 2, 1, 4),  # a fixed position; batch cuts
]


@pytest.mark.parametrize("draw, gamma, steps, fixed_position, group_size", LOSSLESS_CASES)
def test_samples_follow_the_ar_models_exact_distribution(draw, gamma, steps, fixed_position, group_size):
  num_groups = 20000 // group_size
  fixed_L = np.arange(LENGTH) == fixed_position
  fixed_tokens_L = np.where(fixed_L, 2, 0)
  config = speculative.SpeculativeConfig(draft_length=gamma, draft_steps=steps, draw=draw)
  drafter = speculative.MaskedDrafter(mismatched_drafter_model(), DRAFT_PROCESS)
  tokens_NGL, stats = grouped_sampler(drafter, config, group_size)(
      jnp.asarray(fixed_tokens_L), jnp.asarray(fixed_L), jax.random.key(0), num_groups)
  samples_NL = np.asarray(tokens_NGL).reshape(-1, LENGTH)
  sequences_SL, probs_S = exact_ar_distribution(draw, fixed_tokens_L, fixed_L)
  bound = total_variation_bound(probs_S, len(samples_NL), group_size)
  assert total_variation(samples_NL, sequences_SL, probs_S) < bound
  acceptance = np.asarray(stats.accepted_B).sum() / np.asarray(stats.drafted_B).sum()
  assert 0.2 < acceptance < 0.9  # the drafter is really another model, and the rule is exercised


def test_every_draft_is_accepted_when_the_drafter_is_the_ar_model():
  # The AR model as a masked drafter revealing one position per step: q_i = p_i exactly ([BOS], which
  # the AR model never emits, removed as the AR process removes it).
  drafter = speculative.MaskedDrafter(
      lambda canvas_BL, t_B: AR_MODEL(AR_PROCESS.inputs(canvas_BL), t_B).at[..., BOS_ID].set(-jnp.inf),
      DRAFT_PROCESS)
  gamma, length = 3, 8  # two rounds of three accepted drafts and a bonus token
  config = speculative.SpeculativeConfig(draft_length=gamma, draft_steps=gamma)
  tokens_NGL, stats = grouped_sampler(drafter, config, 1)(
      jnp.zeros(length, jnp.int32), jnp.zeros(length, bool), jax.random.key(1), 256)
  assert (np.asarray(stats.rounds) == 2).all()
  np.testing.assert_array_equal(stats.accepted_B, 2 * gamma)
  np.testing.assert_array_equal(stats.mean_accepted_length_B, gamma)
  assert len(set(map(tuple, np.asarray(tokens_NGL)[:, 0].tolist()))) > 100  # samples, not one sequence


def test_masked_drafter_reveals_the_window_left_to_right_in_k_chunks():
  length, start, gamma, steps = 8, 2, 5, 3  # chunks of window indices [0, 1], [2, 3], [4]
  logits_MV = jnp.asarray(np.random.default_rng(2).normal(size=(length + 1, VOCAB)), jnp.float32)
  # Every position's logits are a table's row for the number of masked positions in the canvas.
  model_fn = lambda canvas_BL, t_B: jnp.broadcast_to(logits_MV[(canvas_BL == MASK_ID).sum(axis=1)][:, None],
                                                      canvas_BL.shape + (VOCAB,))
  drafter = speculative.MaskedDrafter(model_fn, DRAFT_PROCESS)
  canvas_L = jnp.array([3, 0, MASK_ID, MASK_ID, 2, MASK_ID, MASK_ID, MASK_ID])  # position 4 is known
  for draw in (base.TokenDraw(temperature=0.0), base.TokenDraw(temperature=0.8, top_k=3)):
    config = speculative.SpeculativeConfig(draft_length=gamma, draft_steps=steps, draw=draw)
    draft = jax.jit(drafter.draft, static_argnums=3)(canvas_L[None], jnp.int32(start),
                                                     jax.random.split(jax.random.key(3), 1), config)
    assert int(draft.network_calls) == steps
    # Masked positions when each index is drawn: 5 (indices 0 and 1), 3 (index 3), 2 (index 4).
    expected_GV = draw.log_probs(DRAFT_PROCESS.masked_log_probs(logits_MV[jnp.array([5, 5, 0, 3, 2])]))
    expected_GV = expected_GV.at[2].set(jnp.where(jnp.arange(VOCAB) == 2, 0.0, -jnp.inf))  # the known token
    np.testing.assert_allclose(draft.log_probs_BGV[0], expected_GV, rtol=1e-6)
    assert draft.tokens_BG[0, 2] == 2
    assert np.isfinite(base.token_log_likelihood(draft.log_probs_BGV, draft.tokens_BG)).all()


# Temperature 0 with small transformers: token-identical to greedy AR decoding.

PAD_ID, NET_MASK_ID, NET_BOS_ID = 0, 1, 2
NET_VOCAB, NET_LENGTH = 13, 12
NET_AR_PROCESS = autoregressive.Autoregressive(vocab_size=NET_VOCAB, bos_id=NET_BOS_ID,
                                               excluded_ids=(NET_MASK_ID,))
NET_DRAFT_PROCESS = masked.MaskedDiffusion(vocab_size=NET_VOCAB, mask_id=NET_MASK_ID)
NET_CONFIG = transformer.TransformerConfig(vocab_size=16, max_len=16, num_layers=2, num_heads=2, embed_dim=16,
                                           mlp_dim=32, causal=True)


@pytest.fixture(scope="module")
def networks():
  causal = nnx.split(transformer.Transformer(NET_CONFIG, rngs=nnx.Rngs(0)))
  bidirectional = nnx.split(transformer.Transformer(
      transformer.TransformerConfig(**{**NET_CONFIG.__dict__, "causal": False}), rngs=nnx.Rngs(1)))
  return causal, bidirectional


@functools.partial(jax.jit, static_argnames=("ar_graphdef", "drafter_graphdef", "eos_id", "draft_with_ar"))
def greedy_pair(ar_graphdef, ar_params, drafter_graphdef, drafter_params, fixed_tokens_BL, fixed_BL, key, *,
                eos_id=None, draft_with_ar=False):
  """(speculative tokens, stats, samplers.decode's greedy tokens) of the causal network."""
  batch_size, length = fixed_BL.shape
  ar_network = nnx.merge(ar_graphdef, ar_params)
  if draft_with_ar:  # one position per step: the drafter's argmax is the AR model's
    drafter_fn = lambda canvas_BL, t_B: ar_network(NET_AR_PROCESS.inputs(canvas_BL)).at[..., NET_BOS_ID].set(
        -jnp.inf)
  else:
    drafter_fn = nnx.merge(drafter_graphdef, drafter_params)
  drafter = speculative.MaskedDrafter(drafter_fn, NET_DRAFT_PROCESS)
  config = speculative.SpeculativeConfig(draft_length=3, draft_steps=3 if draft_with_ar else 2,
                                         draw=base.TokenDraw(temperature=0.0))
  pad_id = None if eos_id is None else PAD_ID
  cache, step_fn = transformer.make_decoder(ar_graphdef, ar_params, batch_size, length)
  tokens_BL, stats = speculative.speculative_decode(step_fn, cache, NET_AR_PROCESS, drafter, config,
                                                    fixed_tokens_BL, fixed_BL, key, eos_id=eos_id, pad_id=pad_id)
  greedy_BL = samplers.decode(step_fn, cache, NET_AR_PROCESS, samplers.SamplerConfig(temperature=0.0),
                              fixed_tokens_BL, fixed_BL, key, eos_id=eos_id, pad_id=pad_id)
  return tokens_BL, stats, greedy_BL


@pytest.mark.parametrize("draft_with_ar", [False, True])
def test_temperature_zero_gives_the_greedy_ar_tokens(networks, draft_with_ar):
  (ar_graphdef, ar_params), (drafter_graphdef, drafter_params) = networks
  prompt_lengths_B1 = np.array([[0], [3], [7], [10]])
  fixed_BL = np.arange(NET_LENGTH) < prompt_lengths_B1
  fixed_tokens_BL = np.where(fixed_BL, np.random.default_rng(4).integers(4, NET_VOCAB, fixed_BL.shape), PAD_ID)
  run = functools.partial(greedy_pair, ar_graphdef, ar_params, drafter_graphdef, drafter_params,
                          jnp.asarray(fixed_tokens_BL), jnp.asarray(fixed_BL), jax.random.key(5),
                          draft_with_ar=draft_with_ar)
  tokens_BL, stats, greedy_BL = run()
  np.testing.assert_array_equal(tokens_BL, greedy_BL)
  acceptance = np.asarray(stats.accepted_B).sum() / np.asarray(stats.drafted_B).sum()
  if draft_with_ar:
    assert acceptance == 1.0
    return
  assert acceptance < 0.5  # the corrections are exercised
  # With an [EOS] id taken from the greedy text of row 0, rows stop and are padded as decode pads them.
  eos_id = int(np.asarray(greedy_BL)[0, 4])
  tokens_BL, stats, greedy_BL = run(eos_id=eos_id)
  np.testing.assert_array_equal(tokens_BL, greedy_BL)
  assert (np.asarray(tokens_BL)[0, 5:] == PAD_ID).all()
  assert stats.row_rounds_B[0] < stats.rounds  # row 0 finished early


# Settings refused.

@pytest.mark.parametrize("settings, message", [
    (dict(draft_length=0), "draft_length"),
    (dict(draft_length=3, draft_steps=0), "draft_steps"),
    (dict(draft_length=3, draft_steps=4), "draft_steps"),
])
def test_bad_settings_are_rejected(settings, message):
  with pytest.raises(ValueError, match=message):
    speculative.SpeculativeConfig(**settings)


@pytest.mark.parametrize("config, drafter_process, settings, message", [
    (speculative.SpeculativeConfig(draft_length=LENGTH, draft_steps=1), DRAFT_PROCESS, {}, "canvas length"),
    (speculative.SpeculativeConfig(2, 1), DRAFT_PROCESS, dict(eos_id=3), "pad_id"),
    (speculative.SpeculativeConfig(2, 1), masked.MaskedDiffusion(vocab_size=VOCAB + 1, mask_id=MASK_ID), {},
     "vocabulary"),
])
def test_bad_decoding_calls_are_rejected(config, drafter_process, settings, message):
  drafter = speculative.MaskedDrafter(lambda canvas_BL, t_B: jnp.zeros(canvas_BL.shape + (VOCAB + 1,)),
                                      drafter_process)
  cache, step_fn = samplers.recompute_decoder(AR_MODEL, 2, LENGTH)
  with pytest.raises(ValueError, match=message):
    speculative.speculative_decode(step_fn, cache, AR_PROCESS, drafter, config,
                                   jnp.zeros((2, LENGTH), jnp.int32), jnp.zeros((2, LENGTH), bool),
                                   jax.random.key(0), **settings)


def test_pipeline_generate_speculative_is_greedy_ar_decoding_at_temperature_zero():
  """What a user runs: Pipeline.generate(method='speculative', drafter=...) on untrained tiny models
  sharing a tokenizer (a masked and a block-diffusion drafter) gives the AR model's own greedy texts,
  and refuses a drafter that cannot draft."""
  ar_model = pipeline_test.untrained(pipeline_test.short_char_config(ar_tiny))
  prompts = ["a", "the pub"]
  greedy = ar_model.generate(prompts, temperature=0.0, max_new_tokens=10)
  drafters = [pipeline_test.untrained(pipeline_test.short_char_config(module), seed=1)
              for module in (mdlm_tiny, bd3lm_tiny)]
  for drafter in drafters:
    assert ar_model.generate(prompts, method="speculative", drafter=drafter, temperature=0.0, max_new_tokens=10,
                             draft_length=3, draft_steps=2) == greedy
  with pytest.raises(ValueError, match="go together"):
    ar_model.generate(prompts, method="speculative")
  with pytest.raises(ValueError, match="must be a masked or block diffusion model"):
    ar_model.generate(prompts, method="speculative", drafter=ar_model)
  with pytest.raises(ValueError, match="decodes an autoregressive model"):
    drafters[0].generate(prompts, method="speculative", drafter=drafters[0])
