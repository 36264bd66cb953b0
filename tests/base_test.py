"""The pieces processes share (processes/base.py): the fused cross-entropy and the restricted softmax."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm_jax.processes import base


def reference_nll(logits_BLW, targets_BL, vocab_size, excluded_ids):
  """-log softmax over ids [0, V) without the excluded ones, by the book."""
  logits_BLV = logits_BLW[..., :vocab_size]
  keep_V = ~jnp.isin(jnp.arange(vocab_size), jnp.array(excluded_ids, jnp.int32))
  log_probs_BLV = jax.nn.log_softmax(jnp.where(keep_V, logits_BLV, -jnp.inf), axis=-1)
  return -jnp.take_along_axis(log_probs_BLV, targets_BL[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("width, excluded_ids", [(11, ()), (16, (0, 3)), (16, (10,))])
def test_cross_entropy_and_its_gradient_equal_the_log_softmax_under_jit(width, excluded_ids):
  vocab_size = 11
  logits_BLW = 3.0 * jax.random.normal(jax.random.key(0), (2, 5, width))
  targets_BL = jax.random.choice(jax.random.key(1), jnp.array([1, 2, 4, 5, 7, 9]), (2, 5))
  weights_BL = jax.random.uniform(jax.random.key(2), (2, 5))
  fused = jax.jit(lambda x: jnp.sum(weights_BL * base.cross_entropy(x, targets_BL, vocab_size, excluded_ids)))
  plain = lambda x: jnp.sum(weights_BL * reference_nll(x, targets_BL, vocab_size, excluded_ids))
  np.testing.assert_allclose(fused(logits_BLW), plain(logits_BLW), rtol=1e-6)
  grad_fused, grad_plain = jax.grad(fused)(logits_BLW), jax.grad(plain)(logits_BLW)
  np.testing.assert_allclose(grad_fused, grad_plain, atol=1e-6)
  assert not np.any(grad_fused[..., vocab_size:])  # padding ids get no gradient


def test_cross_entropy_of_an_excluded_target_is_infinite_and_its_masked_gradient_finite():
  logits_BLW = jax.random.normal(jax.random.key(0), (1, 2, 8))
  targets_BL = jnp.array([[3, 5]])
  loss = lambda x: jnp.where(jnp.array([[False, True]]), base.cross_entropy(x, targets_BL, 8, (3,)), 0.0).sum()
  assert np.isinf(base.cross_entropy(logits_BLW, targets_BL, 8, (3,))[0, 0])
  assert np.all(np.isfinite(jax.grad(loss)(logits_BLW)))


def test_restricted_log_softmax_drops_padding_and_excluded_ids():
  logits_BLW = jax.random.normal(jax.random.key(0), (2, 3, 12))
  log_probs_BLV = base.restricted_log_softmax(logits_BLW, 10, (4,))
  assert log_probs_BLV.shape == (2, 3, 10)
  assert np.all(np.isneginf(log_probs_BLV[..., 4]))
  np.testing.assert_allclose(jax.nn.logsumexp(log_probs_BLV, axis=-1), 0.0, atol=1e-6)
  targets_BL = jnp.full((2, 3), 7)
  np.testing.assert_allclose(-log_probs_BLV[..., 7], base.cross_entropy(logits_BLW, targets_BL, 10, (4,)), rtol=1e-6)


def reference_draw(probs_V, u):
  """The first id whose cumulative mass exceeds u * total, by numpy (float64)."""
  cdf_V = np.cumsum(np.asarray(probs_V, np.float64))
  return int(np.searchsorted(cdf_V, u * cdf_V[-1], side="right"))


@pytest.mark.parametrize("vocab, block_size", [(10, 3), (12, 4), (7, 128), (300, 128)])
def test_inverse_cdf_draw_in_blocks_is_the_draw_of_the_whole_cumulative_sum(vocab, block_size):
  probs_NV = np.array(jax.random.uniform(jax.random.key(vocab), (64, vocab)) ** 4)
  probs_NV[:16, : vocab // 2] = 0.0  # whole blocks without mass
  probs_NV[16:32, 1::2] = 0.0
  u_N = np.array(jax.random.uniform(jax.random.key(1), (64,)))
  u_N[:4] = [0.0, 0.0, 0.999999, 0.5]
  drawn_1N = jax.jit(base.inverse_cdf_draw, static_argnums=2)(jnp.asarray(probs_NV)[None], jnp.asarray(u_N)[None],
                                                              block_size)
  expected_N = [reference_draw(probs_V, u) for probs_V, u in zip(probs_NV, u_N)]
  # float32 sums in another order may move a draw that lands within rounding of a boundary
  assert np.mean(np.asarray(drawn_1N[0]) == expected_N) >= 0.95
  assert np.all(probs_NV[np.arange(64), drawn_1N[0]] > 0)


def test_inverse_cdf_draw_never_lands_on_a_zero_probability_id_when_u_times_the_total_rounds_up():
  probs_1LV = jnp.array([[[0.1, 0.0, 0.3, 0.6, 0.0, 0.0]]])
  for u in (1.0, 0.9999999):
    assert int(base.inverse_cdf_draw(probs_1LV, jnp.array([[u]]), 2)[0, 0]) == 3
  assert int(base.inverse_cdf_draw(probs_1LV, jnp.array([[0.0]]), 2)[0, 0]) == 0


def test_token_draw_without_a_filter_samples_the_tempered_distribution():
  log_probs_1LV = jnp.log(jnp.array([[[0.5, 0.25, 0.125, 0.125, 0.0]]]))
  u_N = jax.random.uniform(jax.random.key(0), (20000,))
  draw = base.TokenDraw(temperature=0.5)
  tokens_N = jax.jit(jax.vmap(lambda u: draw(log_probs_1LV, u[None, None])[0, 0]))(u_N)
  expected_V = np.array([0.5, 0.25, 0.125, 0.125, 0.0]) ** 2
  np.testing.assert_allclose(np.bincount(np.asarray(tokens_N), minlength=5) / 20000, expected_V / expected_V.sum(),
                             atol=0.01)


@pytest.mark.parametrize("width, block_size", [(8192, 128), (300, 128), (7, 128), (12, 4)])
def test_two_level_argmax_is_jnp_argmax_and_takes_the_first_of_ties(width, block_size):
  x_BLV = jax.random.normal(jax.random.key(width), (3, 5, width))
  x_BLV = x_BLV.at[0, 0, width // 3].set(9.0).at[0, 0, width - 1].set(9.0)  # a tie across blocks
  x_BLV = x_BLV.at[1, 0].set(-jnp.inf).at[1, 0, width - 1].set(0.0)  # the last id of a padded block
  got = jax.jit(base.argmax, static_argnums=1)(x_BLV, block_size)
  np.testing.assert_array_equal(got, jnp.argmax(x_BLV, axis=-1))
  assert got[0, 0] == width // 3 and got.dtype == jnp.int32
