"""The row layout of sequence-to-sequence pairs: encoding, source and condition masks, dropout."""
import jax
import jax.numpy as jnp
import numpy as np

from ddlm_jax.data import batching
from ddlm_jax.data import pairs
from ddlm_jax.data import tokenizers

EOS, PAD = tokenizers.EOS_ID, tokenizers.PAD_ID


def test_a_pair_row_is_source_eos_target_eos_then_padding():
  document = pairs.encode_pair([7, 8], [9, EOS + 7, 10], EOS)
  rows_NL = batching.pad_documents([document, pairs.encode_pair([], [11], EOS)], 8, eos_id=EOS, pad_id=PAD)
  np.testing.assert_array_equal(rows_NL, [[7, 8, EOS, 9, EOS + 7, 10, EOS, PAD],
                                          [EOS, 11, EOS, PAD, PAD, PAD, PAD, PAD]])
  np.testing.assert_array_equal(pairs.source_mask(rows_NL, EOS), [[1, 1, 1, 0, 0, 0, 0, 0],
                                                                  [1, 0, 0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(pairs.condition_mask(rows_NL, EOS), [[1, 1, 0, 0, 0, 0, 0, 0],
                                                                     [0, 0, 0, 0, 0, 0, 0, 0]])
  no_eos_L = np.array([5, 6, PAD])
  assert pairs.source_mask(no_eos_L, EOS).all() and pairs.condition_mask(no_eos_L, EOS).all()
  jitted = jax.jit(pairs.condition_mask, static_argnums=1)(jnp.asarray(rows_NL), EOS)
  np.testing.assert_array_equal(jitted, pairs.condition_mask(rows_NL, EOS))


def test_condition_dropout_replaces_only_sources_and_keeps_the_layout():
  rows_BL = jnp.array([[7, 8, EOS, 9, 10, EOS, PAD]] * 64, jnp.int32)
  source_BL, dropped_BL = pairs.source_and_rows(rows_BL, True, 0.5, jax.random.key(6))
  np.testing.assert_array_equal(source_BL[0], [True, True, True, False, False, False, False])
  was_dropped_B = np.asarray(dropped_BL[:, 0] == PAD)
  assert 10 < was_dropped_B.sum() < 54  # about half of 64 rows
  np.testing.assert_array_equal(dropped_BL[was_dropped_B, :2], PAD)
  np.testing.assert_array_equal(dropped_BL[:, 2:], rows_BL[:, 2:])  # [EOS] and targets untouched
  np.testing.assert_array_equal(dropped_BL[~was_dropped_B], rows_BL[~was_dropped_B])
  assert pairs.source_and_rows(rows_BL, False)[0] is None
