"""The parallel rules of block-by-block decoding ('threshold', 'factor', 'entropy_bound') on hand-made
confidences and entropies, their steps per window, and Fast-dLLM's 'prefix' and 'dual' caches on a
random tiny bidirectional transformer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddlm_jax import experiment
from ddlm_jax.decoding import blockwise
from ddlm_jax.networks import transformer
from ddlm_jax.processes import block as block_lib
from ddlm_jax.processes import masked

VOCAB, MASK_ID, PROMPT_ID = 16, 1, 7
BATCH, LENGTH, BLOCK = 3, 8, 4
PROCESS = masked.MaskedDiffusion(vocab_size=VOCAB, mask_id=MASK_ID)
FIXED_BL = jnp.zeros((BATCH, LENGTH), bool).at[0, :3].set(True).at[1, :6].set(True)


def as_mask(rows) -> np.ndarray:
  """bool[B, T] with True at the listed positions of each row (T = 5)."""
  mask = np.zeros((len(rows), 5), bool)
  for row, positions in enumerate(rows):
    mask[row, list(positions)] = True
  return mask


def test_threshold_reveals_the_confident_set_or_else_the_most_confident_one():
  confidence_BT = jnp.array([[0.95, 0.5, 0.9, 0.3, 0.99],  # position 4 (0.99) is fixed
                             [0.2, 0.6, 0.4, 0.1, 0.5],    # none reaches 0.9: the top one
                             [0.99, 0.99, 0.99, 0.99, 0.99]])  # nothing active
  active_BT = jnp.asarray(as_mask([(0, 1, 2, 3), (0, 1, 2, 3, 4), ()]))
  reveal_BT = blockwise.threshold_reveal(confidence_BT, active_BT, 0.9)
  np.testing.assert_array_equal(reveal_BT, as_mask([(0, 2), (1,), ()]))


def test_factor_reveals_the_largest_n_of_the_papers_inequality():
  # Row 0 sorted: 0.99, 0.95, 0.9, 0.75, 0.6 -> (n + 1) (1 - c_(n)) = 0.02, 0.15, 0.4, 1.25, 2.4.
  # Row 1 the same but with 0.99 fixed: 0.95, 0.9, 0.75, 0.6 -> 0.1, 0.3, 1.0 (not < 1), 2.0.
  # Row 2 sorted: 0.6, 0.5, 0.3, 0.2, 0.1 -> 0.8, 1.5, 2.8, 4.0, 5.4 (none below 0.3 or 0.5, yet one).
  confidence_BT = jnp.array([[0.9, 0.6, 0.99, 0.75, 0.95],
                             [0.9, 0.6, 0.99, 0.75, 0.95],
                             [0.6, 0.5, 0.3, 0.2, 0.1]])
  active_BT = jnp.asarray(as_mask([range(5), (0, 1, 3, 4), range(5)]))
  expected = {1.0: [(0, 2, 4), (0, 4), (0,)], 0.3: [(2, 4), (4,), (0,)], 0.5: [(0, 2, 4), (0, 4), (0,)],
              3.0: [range(5), (0, 1, 3, 4), (0, 1, 2)]}
  for factor, rows in expected.items():
    reveal_BT = blockwise.factor_reveal(confidence_BT, active_BT, factor)
    np.testing.assert_array_equal(reveal_BT, as_mask(rows), err_msg=f"factor {factor}")


def test_entropy_bound_reveals_the_largest_prefix_within_the_bound():
  # Sorted entropies 0.02, 0.05, 0.1, 0.3, 0.5 (positions 2, 0, 4, 1, 3): sum - max of the prefixes
  # 0, 0.02, 0.07, 0.17, 0.47. Row 1 fixes position 2, whose zero-cost 0.02 then does not count:
  # 0.05, 0.1, 0.3, 0.5 -> 0, 0.05, 0.15, 0.45.
  entropy_BT = jnp.array([[0.05, 0.3, 0.02, 0.5, 0.1],
                          [0.05, 0.3, 0.02, 0.5, 0.1],
                          [2.0, 2.5, 3.0, 1.5, 2.2]])
  active_BT = jnp.asarray(as_mask([range(5), (0, 1, 3, 4), range(5)]))
  expected = {0.1: [(0, 2, 4), (0, 4), (3,)], 0.2: [(0, 1, 2, 4), (0, 1, 4), (3,)], 0.0: [(2,), (0,), (3,)],
              2.1: [(0, 1, 2, 3, 4), (0, 1, 3, 4), (0, 3)]}
  for bound, rows in expected.items():
    reveal_BT = blockwise.entropy_bound_reveal(entropy_BT, active_BT, bound)
    np.testing.assert_array_equal(reveal_BT, as_mask(rows), err_msg=f"bound {bound}")


@pytest.mark.parametrize("rule", blockwise.PARALLEL_RULES)
def test_parallel_rules_reveal_at_least_one_active_position_and_nothing_else(rule):
  key_logits, key_active = jax.random.split(jax.random.key(3))
  log_probs_BTV = jax.nn.log_softmax(jax.random.normal(key_logits, (64, 6, 5)))
  candidates_BT = log_probs_BTV.argmax(axis=-1)
  active_BT = jax.random.bernoulli(key_active, 0.5, (64, 6))
  # Settings that reveal as little as they can.
  config = blockwise.BlockwiseConfig(block_size=6, rule=rule, threshold=1.0, factor=1e-6, entropy_bound=0.0)
  reveal_BT = blockwise.parallel_reveal(config, log_probs_BTV, candidates_BT, active_BT)
  assert not (reveal_BT & ~active_BT).any()
  np.testing.assert_array_equal(reveal_BT.sum(axis=1), jnp.minimum(active_BT.sum(axis=1), 1))


def test_parallel_rule_settings_are_checked():
  for setting, value in (("threshold", 1.5), ("factor", 0.0), ("entropy_bound", -0.1)):
    with pytest.raises(ValueError, match=setting):
      blockwise.BlockwiseConfig(block_size=4, rule="threshold", **{setting: value})


def position_model(xt_BL, t_B):
  """A test double: logits float32[B, L, V] that depend on the position only (confidences < 1)."""
  del t_B
  table_LV = 2.0 * jax.random.normal(jax.random.key(5), (xt_BL.shape[1], VOCAB))
  return jnp.broadcast_to(table_LV, (*xt_BL.shape, VOCAB))


def decode_with_double(**settings):
  # steps_per_block 1: a parallel rule takes the steps it needs, whatever steps_per_block says.
  config = blockwise.BlockwiseConfig(block_size=BLOCK, steps_per_block=1, cache="none", **settings)
  return blockwise.decode_blocks(blockwise.Network(position_model), PROCESS, config,
                                 jnp.full((BATCH, LENGTH), PROMPT_ID), FIXED_BL, jax.random.key(0))


def assert_valid(tokens_BL):
  assert not (tokens_BL == MASK_ID).any()
  np.testing.assert_array_equal(jnp.where(FIXED_BL, tokens_BL, PROMPT_ID), jnp.full((BATCH, LENGTH), PROMPT_ID))


def test_threshold_spans_one_token_per_step_to_one_step_per_window():
  free_in_window_BN = (~FIXED_BL).reshape(BATCH, -1, BLOCK).sum(axis=2)
  tokens_BL, stats = decode_with_double(rule="threshold", threshold=1.0)
  assert_valid(tokens_BL)
  assert stats["network_calls"] == free_in_window_BN.max(axis=0).sum()  # the fullest row of each window
  tokens_BL, stats = decode_with_double(rule="threshold", threshold=0.0)
  assert_valid(tokens_BL)
  assert stats["network_calls"] == stats["windows"] == LENGTH // BLOCK


def tiny_network(**settings):
  """(graphdef, params) of a tiny transformer, its parameters perturbed so that the zero-initialised
  time conditioning matters."""
  config = transformer.TransformerConfig(vocab_size=VOCAB, max_len=LENGTH, num_layers=2, num_heads=2, embed_dim=16,
                                         mlp_dim=32, **settings)
  graphdef, params = nnx.split(transformer.Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [leaf + 0.3 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)]
  return graphdef, jax.tree.unflatten(treedef, leaves)


BIDIRECTIONAL = tiny_network(time_conditioning=True)


def decode(config, process=PROCESS, network=BIDIRECTIONAL):
  """decode_blocks, jitted, on the canvas of FIXED_BL."""
  graphdef, params = network

  def run(params, tokens_BL, fixed_BL, key):
    cache, step_fn = transformer.make_decoder(graphdef, params, BATCH, LENGTH)
    network = blockwise.Network(experiment.bind(graphdef, params), step_fn, cache)
    return blockwise.decode_blocks(network, process, config, tokens_BL, fixed_BL, key)

  return jax.jit(run)(params, jnp.full((BATCH, LENGTH), PROMPT_ID), FIXED_BL, jax.random.key(0))


def test_approximate_caches_are_exact_at_a_windows_first_step():
  # Threshold 0 reveals each window in its first step, where 'prefix' and 'dual' run the whole canvas.
  outputs = {cache: decode(blockwise.BlockwiseConfig(block_size=BLOCK, rule="threshold", threshold=0.0, cache=cache))
             for cache in ("none", "prefix", "dual")}
  for cache, (tokens_BL, stats) in outputs.items():
    assert_valid(tokens_BL)
    assert stats["network_calls"] == LENGTH // BLOCK, cache
    np.testing.assert_array_equal(tokens_BL, outputs["none"][0], err_msg=cache)


def test_prefix_cache_of_a_single_window_is_full_recomputation():
  # One window has no prefix: every step of 'prefix' reruns the canvas, as 'none' does. Rule 'random'
  # reveals positions whatever the logits (a near-tie of confidences could flip with the rounding).
  outputs = [decode(blockwise.BlockwiseConfig(block_size=LENGTH, steps_per_block=4, rule="random", cache=cache))
             for cache in ("none", "prefix")]
  assert outputs[0][1]["network_calls"] == outputs[1][1]["network_calls"] == 4
  np.testing.assert_array_equal(outputs[1][0], outputs[0][0])


@pytest.mark.parametrize("rule,cache,settings", [
    ("factor", "dual", dict(factor=4.0)),  # up to 3 of a window's 4 per step: confidences near 1 / 15
    ("entropy_bound", "prefix", dict(entropy_bound=3.0)),  # about 2 per step: entropies near log 15
    ("threshold", "exact", dict(threshold=0.1)),
])
def test_parallel_rules_decode_end_to_end(rule, cache, settings):
  if cache == "exact":
    process = block_lib.BlockDiffusion(vocab_size=VOCAB, mask_id=MASK_ID, block_size=BLOCK)
    network = tiny_network(block_size=BLOCK)
  else:
    process, network = PROCESS, BIDIRECTIONAL
  config = blockwise.BlockwiseConfig(block_size=BLOCK, rule=rule, cache=cache, **settings)
  tokens_BL, stats = decode(config, process, network)
  assert_valid(tokens_BL)
  # Some step reveals several positions, and some window takes several steps (over the cache).
  free_in_window_BN = (~FIXED_BL).reshape(BATCH, -1, BLOCK).sum(axis=2)
  assert LENGTH // BLOCK < stats["network_calls"] < free_in_window_BN.max(axis=0).sum()
