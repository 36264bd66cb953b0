"""Block-by-block decoding (decoding/blockwise.py): the exact cache of block diffusion equals full
recomputation, rows stop at the window of their [EOS], ragged prompts share a batch."""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddlm_jax import config as config_lib
from ddlm_jax import experiment
from ddlm_jax import samplers
from ddlm_jax.decoding import blockwise
from ddlm_jax.networks import transformer
from ddlm_jax.processes import block
from ddlm_jax.processes import masked

import pipeline_test  # its untrained tiny Pipeline (tests/ is on the path of a pytest run)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import bd3lm_tiny  # pylint: disable=g-import-not-at-top
from experiments import mdlm_tiny  # pylint: disable=g-import-not-at-top

MASK_ID, EOS_ID, PAD_ID = 1, 2, 0
VOCAB, LENGTH, BLOCK = 16, 16, 4
PROCESS = block.BlockDiffusion(vocab_size=VOCAB, mask_id=MASK_ID, block_size=BLOCK)


@functools.lru_cache(maxsize=None)
def block_network(block_size=BLOCK):
  config = transformer.TransformerConfig(vocab_size=VOCAB, max_len=LENGTH, num_layers=2, num_heads=2, embed_dim=16,
                                         mlp_dim=32, block_size=block_size)
  return nnx.split(transformer.Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)


def ragged_prompts(batch_size=3):
  """Prompts of 1, 6 and 9 tokens (id 7 + row), the rest free."""
  lengths_B = np.array([1, 6, 9, 3][:batch_size])
  fixed_BL = np.arange(LENGTH) < lengths_B[:, None]
  return jnp.asarray(np.where(fixed_BL, 7 + np.arange(batch_size)[:, None], 0)), jnp.asarray(fixed_BL)


@functools.lru_cache(maxsize=None)
def decoder(config, process=PROCESS, prefill_length=0, eos=False):
  graphdef, params = block_network(getattr(process, "block_size", 0))

  def run(params, fixed_tokens_BL, fixed_BL, key, row_ids_B):
    network = blockwise.Network(experiment.bind(graphdef, params))
    if config.cache != "none":
      cache, step_fn = transformer.make_decoder(graphdef, params, *fixed_BL.shape)
      network = blockwise.Network(network.model_fn, step_fn, cache)
    special = dict(eos_id=EOS_ID, pad_id=PAD_ID) if eos else {}
    return blockwise.decode_blocks(network, process, config, fixed_tokens_BL, fixed_BL, key, row_ids_B=row_ids_B,
                                   prefill_length=prefill_length, **special)
  return lambda *arrays: jax.jit(run)(params, *arrays)


def test_logits_over_the_cache_equal_full_recomputation():
  graphdef, params = block_network()

  @functools.partial(jax.jit, static_argnums=3)
  def logits(params, canvas_BL, x0_BL, start):
    """The window [start, start + BLOCK): full block-causal forward, the bound's two-stream view, over
    a cache of [0, start), and over a cache of [0, start - BLOCK) fed [start - BLOCK, start + BLOCK)."""
    model = nnx.merge(graphdef, params)
    window = lambda logits_BLV: logits_BLV[:, start:start + BLOCK]
    full_BTV, training_BTV = window(model(canvas_BL)), window(model(canvas_BL, clean_tokens_BL=x0_BL))
    cache = model.init_cache(2, LENGTH)
    if start:
      _, cache = model.decode(canvas_BL[:, :start], 0, cache)
    cached_BTV, _ = model.decode(canvas_BL[:, start:start + BLOCK], start, cache)
    fused_BTV = cached_BTV
    if start:  # the first step of a window also appends the finished window before it
      cache = model.init_cache(2, LENGTH)
      if start > BLOCK:
        _, cache = model.decode(canvas_BL[:, :start - BLOCK], 0, cache)
      fused_BTV = model.decode(canvas_BL[:, start - BLOCK:start + BLOCK], start - BLOCK, cache)[0][:, BLOCK:]
    return full_BTV, training_BTV, cached_BTV, fused_BTV

  x0_BL = jax.random.randint(jax.random.key(1), (2, LENGTH), 3, VOCAB)
  for current in (0, 2):  # the first window (no cache), and one after a prefill and a fused append
    start = current * BLOCK
    noised_BL = jnp.where(jax.random.uniform(jax.random.key(current), x0_BL.shape) < 0.5, MASK_ID, x0_BL)
    canvas_BL = jnp.where(jnp.arange(LENGTH) < start, x0_BL, jnp.where(jnp.arange(LENGTH) < start + BLOCK,
                                                                         noised_BL, MASK_ID))
    full_BTV, *others = logits(params, canvas_BL, x0_BL, start)
    for other_BTV in others:
      np.testing.assert_allclose(other_BTV, full_BTV, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rule,threshold", [("ancestral", 0.9), ("random", 0.9), ("threshold", 0.0)])
def test_the_exact_cache_decodes_the_tokens_of_full_recomputation(rule, threshold):
  """Rules whose choice of positions does not rank the logits: their tokens match exactly (a ranking
  of near-tied confidences may flip at float32 rounding; the logits themselves match to 1e-5 above)."""
  fixed_tokens_BL, fixed_BL = ragged_prompts()
  arrays = (fixed_tokens_BL, fixed_BL, jax.random.key(0), jnp.arange(3))
  settings = dict(block_size=BLOCK, steps_per_block=2, rule=rule, threshold=threshold)
  cached_BL, cached_stats = decoder(blockwise.BlockwiseConfig(**settings))(*arrays)
  full_BL, full_stats = decoder(blockwise.BlockwiseConfig(**settings, cache="none"))(*arrays)
  np.testing.assert_array_equal(cached_BL, full_BL)
  np.testing.assert_array_equal(np.where(fixed_BL, cached_BL, fixed_tokens_BL), fixed_tokens_BL)  # prompts kept
  assert not (np.asarray(cached_BL) == MASK_ID).any()
  assert int(cached_stats["network_calls"]) == int(full_stats["network_calls"])


def test_a_row_decodes_the_same_alone_as_in_a_ragged_batch_and_after_a_prefill():
  config = blockwise.BlockwiseConfig(BLOCK, steps_per_block=2, rule="low_confidence")
  fixed_tokens_BL, fixed_BL = ragged_prompts(4)
  key = jax.random.key(5)
  together_BL, _ = decoder(config)(fixed_tokens_BL, fixed_BL, key, jnp.arange(4))
  for row in range(4):
    alone_1L, _ = decoder(config)(fixed_tokens_BL[row:row + 1], fixed_BL[row:row + 1], key, jnp.array([row]))
    np.testing.assert_array_equal(alone_1L[0], together_BL[row])
  # Rows 1 and 2 share a fixed first window: run as one chunk before the loop, same tokens.
  prefilled_BL, _ = decoder(config, prefill_length=BLOCK)(fixed_tokens_BL[1:3], fixed_BL[1:3], key, jnp.arange(1, 3))
  np.testing.assert_array_equal(prefilled_BL, together_BL[1:3])


def eos_at(stop_B):
  """A denoiser double: row b's tokens are 7 before position stop_B[b] (read from its first token,
  stop = token - 3), [EOS] from there on."""
  def model_fn(tokens_BL, t_B):
    del t_B
    stop_B1 = tokens_BL[:, :1] - 3
    eos_BL = jnp.arange(tokens_BL.shape[1]) >= stop_B1
    return jnp.where(eos_BL[..., None], jax.nn.one_hot(EOS_ID, VOCAB), jax.nn.one_hot(7, VOCAB)) * 10.0
  return model_fn


@pytest.mark.parametrize("stops,windows", [((5, 5), 2), ((5, 13), 4), ((2, 6), 2)])
def test_rows_stop_at_the_window_of_their_eos_and_the_batch_when_all_are_done(stops, windows):
  process = masked.MaskedDiffusion(vocab_size=VOCAB, mask_id=MASK_ID)
  config = blockwise.BlockwiseConfig(BLOCK, steps_per_block=2, rule="low_confidence", cache="none", temperature=0.0)
  stop_B = np.array(stops)
  fixed_BL = jnp.zeros((2, LENGTH), bool).at[:, 0].set(True)
  fixed_tokens_BL = jnp.zeros((2, LENGTH), jnp.int32).at[:, 0].set(jnp.asarray(stop_B) + 3)
  tokens_BL, stats = jax.jit(lambda f, x, k: blockwise.decode_blocks(
      blockwise.Network(eos_at(stop_B)), process, config, f, x, k, eos_id=EOS_ID, pad_id=PAD_ID))(
          fixed_tokens_BL, fixed_BL, jax.random.key(0))
  assert int(stats["windows"]) == windows and int(stats["network_calls"]) == 2 * windows
  for row, stop in enumerate(stop_B):
    expected_L = np.where(np.arange(LENGTH) < stop, 7, PAD_ID)
    expected_L[0], expected_L[stop] = stop + 3, EOS_ID
    np.testing.assert_array_equal(tokens_BL[row], expected_L)


def test_ancestral_steps_reveal_every_position_by_the_last_step_of_a_window():
  """At most S steps a window (the last reveals what is left), fewer once every row's window is full."""
  config = blockwise.BlockwiseConfig(BLOCK, steps_per_block=3, rule="ancestral")
  fixed_tokens_BL, fixed_BL = ragged_prompts()
  calls = []
  for seed in range(4):
    tokens_BL, stats = decoder(config)(fixed_tokens_BL, fixed_BL, jax.random.key(seed), jnp.arange(3))
    assert not (np.asarray(tokens_BL) == MASK_ID).any() and int(stats["windows"]) == LENGTH // BLOCK
    calls.append(int(stats["network_calls"]))
  assert max(calls) <= 3 * LENGTH // BLOCK and min(calls) < 3 * LENGTH // BLOCK, calls


@pytest.mark.parametrize("settings,process,message", [
    (dict(block_size=8), PROCESS, "decodes its own blocks"),
    (dict(block_size=4, cache="dual"), PROCESS, "approximates a bidirectional model"),
    (dict(block_size=4, cache="exact"), masked.MaskedDiffusion(vocab_size=VOCAB, mask_id=MASK_ID), "needs a block"),
    (dict(block_size=5, cache="none"), masked.MaskedDiffusion(vocab_size=VOCAB, mask_id=MASK_ID), "multiple of"),
])
def test_settings_the_process_cannot_take_are_refused(settings, process, message):
  with pytest.raises(ValueError, match=message):
    blockwise.check_blockwise(process, blockwise.BlockwiseConfig(**settings), LENGTH)


def test_bad_settings_are_refused_by_name():
  with pytest.raises(ValueError, match="steps_per_block"):
    blockwise.BlockwiseConfig(4, steps_per_block=0)
  with pytest.raises(ValueError, match="decoding cache"):
    blockwise.BlockwiseConfig(4, cache="kv")


# What a user runs: the run's config picks the decoder, Pipeline.generate runs it.

def test_the_run_config_picks_block_by_block_decoding_and_refuses_what_it_cannot_take():
  config = bd3lm_tiny.get_config()
  decoding = config_lib.sampler_config(config, strategy="low_confidence", steps_per_block=2)
  assert decoding == blockwise.BlockwiseConfig(4, steps_per_block=2, rule="low_confidence", cache="exact")
  assert isinstance(config_lib.sampler_config(mdlm_tiny.get_config()), samplers.SamplerConfig)
  masked_config = mdlm_tiny.get_config()
  assert config_lib.sampler_config(masked_config, method="blockwise", block_length=16, cache="dual").cache == "dual"
  with pytest.raises(ValueError, match="needs block_length > 0"):
    config_lib.sampler_config(masked_config, method="blockwise")
  with pytest.raises(ValueError, match="record_trajectory applies to the scan sampler"):
    config_lib.sampler_config(config, record_trajectory=True)
  with pytest.raises(ValueError, match="decodes block by block"):
    config_lib.sampler_config(config, method="scan")
  config.sample.cache = "dual"
  with pytest.raises(ValueError, match="config.sample: cache 'dual' approximates a bidirectional model"):
    config_lib.validate(config)
  speculative_config = mdlm_tiny.get_config()
  speculative_config.process.name, speculative_config.sample.method = "autoregressive", "speculative"
  with pytest.raises(ValueError, match="needs a drafter model"):  # a run's config cannot name one
    config_lib.validate(speculative_config)


@pytest.mark.parametrize("module,settings", [
    (bd3lm_tiny, dict(strategy="low_confidence", steps_per_block=2)),
    (mdlm_tiny, dict(method="blockwise", block_length=8, cache="dual", strategy="threshold", threshold=0.5)),
])
def test_generate_decodes_ragged_prompts_block_by_block_up_to_max_new_tokens(module, settings):
  model = pipeline_test.untrained(pipeline_test.short_char_config(module))
  prompts = ["a", "the rest"]
  texts = model.generate(prompts, max_new_tokens=5, seed=0, **settings)
  for prompt, text in zip(prompts, texts):
    assert text.startswith(prompt) and len(model.tokenizer.encode(text)) <= len(model.tokenizer.encode(prompt)) + 5
  again = model.generate(prompts[1:], max_new_tokens=5, seed=0, **settings)  # the 2nd row, alone as row 0
  assert model.generate(prompts[::-1], max_new_tokens=5, seed=0, **settings)[0] == again[0]


def test_generate_streams_each_finished_window_and_ends_with_the_texts_it_returns():
  model = pipeline_test.untrained(pipeline_test.short_char_config(bd3lm_tiny))
  streamed = []
  texts = model.generate(["a", "the rest"], seed=0, stream=lambda first, batch_texts: streamed.append(
      (first, batch_texts)), strategy="low_confidence", steps_per_block=2)
  assert streamed and all(first == 0 and len(batch_texts) == 2 for first, batch_texts in streamed)
  for earlier, later in zip(streamed, streamed[1:]):  # each window extends what came before
    assert all(new.startswith(old) for old, new in zip(earlier[1], later[1]))
  assert streamed[-1][1] == texts
  with pytest.raises(ValueError, match="stream reports the windows"):
    pipeline_test.untrained(pipeline_test.short_char_config(mdlm_tiny)).generate(["a"], stream=print)
