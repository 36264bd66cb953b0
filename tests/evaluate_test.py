"""The held-out ELBO estimator against a known answer: a perfect denoiser on a tiny distribution."""
import dataclasses
import functools
import types

import jax
import numpy as np
import pytest

from ddlm_jax import evaluate
from ddlm_jax import testing
from ddlm_jax.data import corpus
from ddlm_jax.processes import masked

MASK_ID = 0


def perfect_nelbo_fn(dist):
  process = masked.MaskedDiffusion(vocab_size=4, mask_id=MASK_ID, antithetic_time=False)
  model_fn = testing.exact_masked_denoiser(dist, 4, MASK_ID)
  return jax.jit(lambda params, rows_BL, key: process.nelbo(model_fn, rows_BL, key).nats_B)


def test_elbo_of_a_perfect_denoiser_is_the_true_nll_with_a_calibrated_stderr():
  dist = testing.TinyDistribution.random((1, 2, 3), length=4, seed=7)
  rows_NL = dist.sample(200, seed=8)
  num_tokens_N = np.full(200, 3)  # a divisor other than L, to check it is the one used
  true_bits_per_token = -dist.log_prob(rows_NL).sum() / np.log(2) / num_tokens_N.sum()
  nelbo_fn = perfect_nelbo_fn(dist)
  results = [evaluate.elbo(nelbo_fn, None, rows_NL, num_tokens_N, num_samples=8, batch_size=64, seed=seed)
             for seed in range(12)]
  estimates = np.array([r.bits_per_token for r in results])
  stderrs = np.array([r.stderr for r in results])
  assert all(r.num_tokens == 600 and r.num_sequences == 200 for r in results)
  z = (estimates - true_bits_per_token) / stderrs
  assert np.abs(z).max() < 4, z
  # The reported standard error matches the spread of independent estimates within sampling error.
  assert 0.5 < estimates.std(ddof=1) / stderrs.mean() < 1.6



def test_bits_per_char_rescales_the_same_total():
  result = evaluate.ElboResult(bits_per_token=2.0, stderr=0.1, num_sequences=1, num_samples=2,
                               bits_per_sequence=np.array([60.0]), tokens_per_sequence=np.array([30]),
                               chars_per_sequence=np.array([120]))
  assert result.bits_per_char == 0.5
  assert result.summary()["bits_per_char"] == 0.5


def test_unigram_entropy_of_known_frequencies():
  assert evaluate.unigram_entropy_bits([[5, 5, 5, 5]]) == 0.0
  np.testing.assert_allclose(evaluate.unigram_entropy_bits([[1, 2], [3, 4]]), 2.0)
  np.testing.assert_allclose(evaluate.unigram_entropy_bits([[1, 1, 2, 3]]), 1.5)
  assert evaluate.unigram_entropy_bits([[], []]) == 0.0


class _FixedScoreModel:
  """A stand-in for an AR pipeline that scores 3 bits per token."""

  def __init__(self):
    self.calls = []

  def score(self, texts, truncate):
    self.calls.append((list(texts), truncate))
    return evaluate.ElboResult(bits_per_token=3.0, stderr=0.0, num_sequences=len(texts), num_samples=2,
                               bits_per_sequence=np.zeros(len(texts)), tokens_per_sequence=np.ones(len(texts)))


def test_sample_quality_judges_with_the_ar_model_and_the_generator():
  reference = corpus.default_corpus()
  document = reference.sample(1, seed=3)[0]
  texts = [document.text, "not a restaurant at all", "one two"]
  ar_model = _FixedScoreModel()
  quality = evaluate.sample_quality(texts, str.split, ar_model=ar_model, corpus=reference)
  assert ar_model.calls == [(texts, True)]  # every sample, long ones cut to the judge's canvas
  assert quality.generative_perplexity == 8.0
  np.testing.assert_allclose(quality.well_formed_fraction, 1 / 3)
  np.testing.assert_allclose(quality.generator_bits_per_document, -document.log_prob / np.log(2), rtol=1e-9)
  assert quality.unigram_entropy_bits == evaluate.unigram_entropy_bits([text.split() for text in texts])
  assert set(quality.summary()) >= {"generative_perplexity", "unigram_entropy_bits", "well_formed_fraction"}


def test_empty_samples_are_not_scored_by_the_judge_but_count_as_unparsed():
  ar_model = _FixedScoreModel()
  reference = corpus.default_corpus()
  document = reference.sample(1, seed=3)[0]
  quality = evaluate.sample_quality([document.text, "", " "], str.split, ar_model=ar_model, corpus=reference)
  assert ar_model.calls == [([document.text], True)] and quality.generative_perplexity == 8.0
  np.testing.assert_allclose(quality.well_formed_fraction, 1 / 3)
  assert evaluate.sample_quality([""], str.split, ar_model=ar_model).generative_perplexity is None


def _row_sum_nats(params, rows_BL, key):
  """A stand-in NLL: each row's nats are the sum of its ids."""
  del params, key
  return np.asarray(rows_BL, np.float32).sum(-1)


def test_an_exact_likelihood_is_scored_in_one_pass_and_called_an_nll():
  calls = []

  def nll_fn(params, rows_BL, key):
    calls.append(1)
    return _row_sum_nats(params, rows_BL, key)

  rows_NL = np.array([[1, 2], [3, 4]])
  result = evaluate.elbo(nll_fn, None, rows_NL, np.array([2, 2]), num_samples=8, batch_size=2, seed=0, exact=True)
  assert len(calls) == 1 and result.num_samples == 1 and result.stderr == 0.0
  np.testing.assert_allclose(result.bits_per_sequence, [3 / np.log(2), 7 / np.log(2)], rtol=1e-6)
  np.testing.assert_allclose(result.bits_per_token, 10 / np.log(2) / 4, rtol=1e-6)
  result = dataclasses.replace(result, reference_bits_per_token=1.0, reference_bits_per_document=2.0)
  text = result.describe()
  assert text.startswith("held-out exact NLL: ") and "per document: NLL " in text
  assert "NELBO" not in text and "draws" not in text
  summary = result.summary()
  assert summary["estimate"] == "exact NLL" and "elbo_samples" not in summary


def test_the_labels_say_how_a_bound_was_estimated():
  rows_NL, num_tokens_N = np.array([[1, 2], [3, 4]]), np.array([2, 2])
  score = functools.partial(evaluate.elbo, _row_sum_nats, None, rows_NL, num_tokens_N, num_samples=3,
                            batch_size=2, seed=0)
  drawn, summed = score(), score(exact_time_sum=True)
  assert "draws of t each" in drawn.describe() and drawn.summary()["estimate"] == "NELBO, Monte Carlo over t"
  text = summed.describe()
  assert text.startswith("held-out NELBO, every step of the bound summed: ")
  assert "3 draws of x_t at each step" in text and "draws of t" not in text
  assert summed.summary()["estimate"] == "NELBO, every step summed"
  for result in (drawn, summed):
    with_reference = dataclasses.replace(result, reference_bits_per_token=1.0, reference_bits_per_document=2.0)
    assert "per document: NELBO " in with_reference.describe()
    assert result.summary()["elbo_samples"] == 3
  with pytest.raises(ValueError, match="exact_time_sum"):
    score(exact=True, exact_time_sum=True)


def test_held_out_elbo_scores_only_the_documents_the_generator_scored_whole():
  rows_NL = np.array([[1, 2, 0], [3, 4, 5], [6, 0, 0], [7, 8, 0]])
  data = types.SimpleNamespace(eval_rows=rows_NL, eval_num_tokens=np.array([2, 3, 1, 2]),
                               eval_num_chars=np.array([10, 15, 5, 9]),
                               eval_log_probs=np.array([-2.0, np.nan, -4.0, -8.0]))
  result = evaluate.held_out_elbo(_row_sum_nats, None, data, num_samples=2, batch_size=2, max_rows=3, seed=0,
                                  rows="first")
  # Row 1 was cut short (NaN) and row 3 is past max_rows: rows 0 and 2 remain, 3 tokens, 15 characters.
  assert (result.num_sequences, result.num_tokens, result.num_chars) == (2, 3, 15)
  np.testing.assert_allclose(result.bits_per_sequence, np.array([3, 6]) / np.log(2), rtol=1e-6)
  np.testing.assert_allclose(result.bits_per_token, 9 / np.log(2) / 3, rtol=1e-6)
  np.testing.assert_allclose(result.bits_per_char, 9 / np.log(2) / 15, rtol=1e-6)
  np.testing.assert_allclose(result.reference_bits_per_token, 6 / np.log(2) / 3)
  np.testing.assert_allclose(result.reference_bits_per_document, 3 / np.log(2))
  # Off the embedded corpus there is no reference and every row up to max_rows counts (3 rows in
  # batches of 2: the padding row of the last batch is dropped).
  data.eval_log_probs = None
  result = evaluate.held_out_elbo(_row_sum_nats, None, data, num_samples=2, batch_size=2, max_rows=3, seed=0,
                                  exact_time_sum=True, rows="first")
  assert (result.num_sequences, result.num_tokens, result.num_chars) == (3, 6, 30)
  np.testing.assert_allclose(result.bits_per_sequence, np.array([3, 12, 6]) / np.log(2), rtol=1e-6)
  assert result.reference_bits_per_token is None and result.exact_time_sum


def test_spread_scores_evenly_spaced_rows_and_first_the_first_ones():
  """Of 10 rows, 'spread' scores np.round(np.linspace(0, 9, 4)) = rows 0, 3, 6, 9; 'first' rows
  0-3; both score all of them when max_rows reaches the split's size."""
  data = types.SimpleNamespace(eval_rows=np.arange(10)[:, None], eval_num_tokens=np.ones(10, int),
                               eval_num_chars=np.ones(10, int), eval_log_probs=None)
  scored_rows = lambda **kwargs: np.round(evaluate.held_out_elbo(
      _row_sum_nats, None, data, num_samples=2, batch_size=3, seed=0, **kwargs).bits_per_sequence * np.log(2))
  np.testing.assert_array_equal(scored_rows(max_rows=4), [0, 3, 6, 9])  # 'spread' is the default
  np.testing.assert_array_equal(scored_rows(max_rows=4, rows="first"), [0, 1, 2, 3])
  np.testing.assert_array_equal(scored_rows(max_rows=9), [0, 1, 2, 3, 4, 6, 7, 8, 9])
  for rows in evaluate.ROW_SELECTIONS:
    np.testing.assert_array_equal(scored_rows(max_rows=12, rows=rows), np.arange(10))
  with pytest.raises(ValueError, match="config.eval.rows='last'"):
    scored_rows(max_rows=4, rows="last")


def test_stderr_over_sequences_is_the_ratio_estimators_on_hand_numbers():
  """Bits 3, 5, 10 over 1, 2, 3 tokens: R = 18 / 6 = 3, residuals y - R x = 0, -1, 1, so the
  s.e. is sqrt(3 / 2 * 2) / 6; over 2, 4, 6 characters half that."""
  result = evaluate.ElboResult(bits_per_token=3.0, stderr=0.0, num_sequences=3, num_samples=1,
                               bits_per_sequence=np.array([3.0, 5.0, 10.0]), tokens_per_sequence=np.array([1, 2, 3]),
                               chars_per_sequence=np.array([2, 4, 6]), exact=True)
  np.testing.assert_allclose(result.stderr_over_sequences, np.sqrt(3.0) / 6)
  np.testing.assert_allclose(result.bits_per_char_stderr_over_sequences, np.sqrt(3.0) / 12)
  summary = result.summary()
  assert summary["bits_per_token_stderr_over_sequences"] == result.stderr_over_sequences > 0 == summary["bits_per_token_stderr"]
  assert summary["bits_per_char_stderr_over_sequences"] == result.bits_per_char_stderr_over_sequences
  assert f"± {np.sqrt(3.0) / 6:.4f} bits/token over sequences" in result.describe()
  # Sequences of equal length: the standard error of the mean of their bits per token.
  bits_N = np.array([4.0, 7.0, 1.0, 9.0])
  np.testing.assert_allclose(evaluate.ratio_stderr(bits_N, np.full(4, 5)), (bits_N / 5).std(ddof=1) / 2)
  assert np.isnan(evaluate.ratio_stderr(bits_N[:1], np.array([5])))


def test_row_inputs_are_batched_beside_their_rows():
  """Per-row arrays reach nelbo_fn in the batches of their rows, the last batch padded alike."""
  rows_NL, weights_NL = np.array([[1, 2], [3, 4], [5, 6]]), np.array([[1, 0], [0, 1], [1, 1]])
  weighted_nats = lambda params, rows_BL, key, weights_BL: np.asarray(rows_BL * weights_BL, np.float32).sum(-1)
  result = evaluate.elbo(weighted_nats, None, rows_NL, np.array([1, 1, 2]), num_samples=1, batch_size=2, seed=0,
                         exact=True, row_inputs=(weights_NL,))
  np.testing.assert_allclose(result.bits_per_sequence * np.log(2), [1, 4, 11], rtol=1e-6)
  with pytest.raises(ValueError, match="do not have the 3 rows"):
    evaluate.elbo(weighted_nats, None, rows_NL, np.array([1, 1, 2]), num_samples=1, batch_size=2, seed=0,
                  exact=True, row_inputs=(weights_NL[:2],))


def test_bleu_is_100_for_identical_texts_and_0_for_disjoint_ones():
  references = ["the golden lantern is a cosy pub in the old town .", "it has a low price range ."]
  assert evaluate.bleu(references, references) == pytest.approx(100.0)
  assert evaluate.bleu(["one two three four five", "six seven eight nine"], references) < 1e-6
  assert 0 < evaluate.bleu(["the golden lantern is a pub in the old town .", references[1]], references) < 100
  with pytest.raises(ValueError, match="as many hypotheses as references"):
    evaluate.bleu(references, references[:1])


def test_mbr_selects_the_consensus_candidate():
  central = "the golden lantern is a cosy italian pub in the old town"
  candidates = ["completely different words about nothing at all here",
                "the golden lantern is a cosy italian pub near the old town",
                central,
                "the golden lantern is a quiet italian pub in the old town"]
  assert evaluate.mbr_select(candidates) == 2
  assert evaluate.mbr_select(candidates[::-1]) == 1
  assert evaluate.mbr_select(["only one"]) == 0
  assert evaluate.mbr_select(["same text", "same text", "same text"]) == 0  # ties: lowest index


def test_attribute_accuracy_on_a_hand_example():
  truth = [{"name": "The Fox", "food": "Thai"},
           {"name": "The Owl", "food": "Greek", "area": "seafront"},
           {"name": "The Elm", "food": "Irish"}]
  predicted = [{"name": "The Fox", "food": "Thai"},
               {"name": "The Owl", "food": "Thai", "area": "seafront", "near": "Old Pier"},
               None]
  assert evaluate.attribute_accuracy(predicted, truth) == {
      "exact_match": pytest.approx(1 / 3), "attribute_accuracy": pytest.approx(4 / 7),
      "well_formed": pytest.approx(2 / 3)}
