"""Block diffusion (processes/block.py) and the block-causal network: the training mask, the bound's
limits (one block is MDLM, blocks of one token are the exact NLL), one network pass per batch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddlm_jax import experiment
from ddlm_jax.networks import layers
from ddlm_jax.networks import transformer
from ddlm_jax.processes import block
from ddlm_jax.processes import masked

MASK_ID = 1


def tiny_network(block_size, length=12, vocab_size=16, seed=0):
  config = transformer.TransformerConfig(vocab_size=vocab_size, max_len=length, num_layers=2, num_heads=2,
                                         embed_dim=16, mlp_dim=32, block_size=block_size)
  return nnx.split(transformer.Transformer(config, rngs=nnx.Rngs(seed)), nnx.Param)


@pytest.mark.parametrize("length,block_size", [(12, 4), (12, 3), (5, 2)])
def test_the_training_mask_is_noised_block_plus_earlier_clean_blocks(length, block_size):
  mask = np.asarray(layers.block_diffusion_mask(length, block_size))[0]
  for query in range(2 * length):
    for key in range(2 * length):
      query_block, key_block = (query % length) // block_size, (key % length) // block_size
      if query < length:  # a noised token
        expected = query_block == key_block if key < length else key_block < query_block
      else:  # a clean token: block-causal over the clean copy, never a noised token
        expected = key >= length and key_block <= query_block
      assert mask[query, key] == expected, (query, key)
  assert not np.diag(mask[:length, length:]).any()  # never its own clean copy


def test_block_network_logits_see_only_their_noised_block_and_the_clean_blocks_before_it():
  graphdef, params = tiny_network(block_size=4)
  model = nnx.merge(graphdef, params)
  xt_BL = jax.random.randint(jax.random.key(1), (2, 12), 2, 16)
  x0_BL = jax.random.randint(jax.random.key(2), (2, 12), 2, 16)
  base_BLV = model(xt_BL, clean_tokens_BL=x0_BL)
  blocks_L = np.arange(12) // 4
  for changed in range(3):
    in_block_L = blocks_L == changed
    new_clean = model(xt_BL, clean_tokens_BL=jnp.where(in_block_L, (x0_BL + 1) % 16, x0_BL))
    new_noised = model(jnp.where(in_block_L, (xt_BL + 1) % 16, xt_BL), clean_tokens_BL=x0_BL)
    moved_clean_L = np.abs(np.asarray(new_clean - base_BLV)).max(axis=(0, 2))
    moved_noised_L = np.abs(np.asarray(new_noised - base_BLV)).max(axis=(0, 2))
    np.testing.assert_array_equal(moved_clean_L[blocks_L <= changed], 0.0)
    assert (moved_clean_L[blocks_L > changed] > 1e-4).all()
    np.testing.assert_array_equal(moved_noised_L[~in_block_L], 0.0)
    assert (moved_noised_L[in_block_L] > 1e-4).all()


def test_one_block_of_the_whole_length_is_the_masked_bound():
  """block_size = L: the block network is the bidirectional one and the bound is MDLM's, draw for draw."""
  graphdef, params = tiny_network(block_size=12)
  bidirectional = nnx.merge(tiny_network(block_size=0)[0], params)
  x0_BL = jax.random.randint(jax.random.key(3), (8, 12), 2, 16)
  one_block = block.BlockDiffusion(vocab_size=16, mask_id=MASK_ID, block_size=12)
  mdlm = masked.MaskedDiffusion(vocab_size=16, mask_id=MASK_ID)
  ours_fn = jax.jit(lambda key: one_block.nelbo(experiment.bind(graphdef, params), x0_BL, key).nats_B)
  theirs_fn = jax.jit(lambda key: mdlm.nelbo(lambda xt_BL, t_B: bidirectional(xt_BL, t_B), x0_BL, key).nats_B)
  for seed in range(3):
    ours, theirs = ours_fn(jax.random.key(seed)), theirs_fn(jax.random.key(seed))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert np.asarray(ours).sum() > 0


def test_blocks_of_one_token_with_an_exact_denoiser_average_to_the_exact_nll():
  """block_size = 1: each token is masked or clean; with p(x^l | x^{<l}) exact the bound's mean is
  the exact NLL (the weight 1/t integrates the masking probability t to 1)."""
  vocab_size, length, data_ids = 6, 5, np.arange(2, 6)
  rng = np.random.default_rng(0)
  initial_D = rng.dirichlet(np.ones(4))
  transition_DD = rng.dirichlet(np.ones(4), size=4)
  log_initial_V = np.full(vocab_size, -np.inf)
  log_initial_V[data_ids] = np.log(initial_D)
  log_transition_VV = np.full((vocab_size, vocab_size), -np.inf)
  log_transition_VV[np.ix_(data_ids, data_ids)] = np.log(transition_DD)

  def exact_denoiser(xt_BL, t_B, clean_tokens_BL):
    del xt_BL, t_B  # a masked token's distribution given the clean tokens before it
    following_BLV = jnp.asarray(log_transition_VV)[clean_tokens_BL[:, :-1]]
    first_B1V = jnp.broadcast_to(jnp.asarray(log_initial_V), (clean_tokens_BL.shape[0], 1, vocab_size))
    return jnp.concatenate([first_B1V, following_BLV], axis=1)

  sequences_NL = np.array([[2, 3, 3, 5, 4], [5, 5, 2, 2, 3], [4, 2, 5, 3, 3]])
  exact_N = np.array([-log_initial_V[row[0]] - sum(log_transition_VV[a, b] for a, b in zip(row, row[1:]))
                      for row in sequences_NL])
  repeats = 4000
  process = block.BlockDiffusion(vocab_size=vocab_size, mask_id=MASK_ID, block_size=1)
  rows_BL = jnp.asarray(np.repeat(sequences_NL, repeats, axis=0))
  nats_NR = np.asarray(jax.jit(lambda x, k: process.nelbo(exact_denoiser, x, k).nats_B)(
      rows_BL, jax.random.key(0))).reshape(len(sequences_NL), repeats)
  standard_error_N = nats_NR.std(axis=1) / np.sqrt(repeats)
  assert (np.abs(nats_NR.mean(axis=1) - exact_N) < 4 * standard_error_N).all(), (nats_NR.mean(axis=1), exact_N)
  assert (standard_error_N < 0.1 * exact_N).all()  # the check has power


def test_every_block_is_scored_in_one_network_pass():
  calls = []

  def model_fn(xt_BL, t_B, clean_tokens_BL):
    calls.append(xt_BL.shape)
    assert t_B is None and clean_tokens_BL.shape == xt_BL.shape
    return jnp.zeros((*xt_BL.shape, 16))

  process = block.BlockDiffusion(vocab_size=16, mask_id=MASK_ID, block_size=4)
  process.loss(model_fn, jnp.full((2, 12), 3), jax.random.key(0))
  assert calls == [(2, 12)]


def test_each_block_draws_its_own_time():
  process = block.BlockDiffusion(vocab_size=16, mask_id=MASK_ID, block_size=4)
  t_BL = np.asarray(process.block_times(jax.random.key(0), 8, 12))
  np.testing.assert_array_equal(t_BL, np.repeat(t_BL[:, ::4], 4, axis=1))
  assert len(np.unique(t_BL)) == 8 * 3  # stratified over the batch's 24 blocks, all distinct
  assert (np.ptp(t_BL[:, ::4], axis=1) > 0.5).all()  # a row's blocks spread over [0, 1), not bunched


def test_block_settings_are_refused_by_name():
  with pytest.raises(ValueError, match="block_size must be >= 1"):
    block.BlockDiffusion(vocab_size=16, mask_id=MASK_ID, block_size=0)
  with pytest.raises(ValueError, match="needs a bidirectional token model"):
    transformer.TransformerConfig(vocab_size=16, max_len=8, block_size=4, causal=True)
  graphdef, params = tiny_network(block_size=0)
  with pytest.raises(ValueError, match="needs a block model"):
    nnx.merge(graphdef, params)(jnp.zeros((1, 12), jnp.int32), clean_tokens_BL=jnp.zeros((1, 12), jnp.int32))
