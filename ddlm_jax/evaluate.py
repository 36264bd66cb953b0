"""Likelihood on one scale, and the quality of samples.

Every family is scored by the same `NelboFn`: the exact NLL for the autoregressive baseline, an
upper bound (negative ELBO) for the diffusion families. A diffusion bound is a Monte Carlo
estimate: each sequence's NELBO is averaged over `num_samples` draws of (t, x_t) (of x_t at every
step when a discrete-time bound sums all its steps), and the standard error of the total comes
from the spread of those draws. Beside it stands the standard error over sequences: the scored
sequences taken as a sample of the text, bits per token a ratio estimator (total bits / total
tokens) whose spread includes the Monte Carlo noise of each sequence's mean. Bits per token divide
the total by the number of text tokens (the [EOS] and padding of a held-out row laid out as in
training are scored by the model but not counted), the same divisor used for the generator's
exact NLL of the same documents, so the two numbers are directly comparable and the bound must
lie above. Bits per character divide the same total by the characters of the text.

Samples are judged by their generative perplexity under a trained autoregressive model, always
beside their unigram entropy (repetitive, degenerate samples reach a low perplexity at a low
entropy), and on the embedded corpus by the generator itself: the share of samples it can parse
and its exact NLL of those.

Sequence-to-sequence outputs are judged against their references by corpus BLEU (sacrebleu) and,
for text-to-data, by how many attributes of the true record they recover. `mbr_select` picks
one output of several drawn for the same source, by minimum Bayes risk (as DiffuSeq does).
"""
import collections
import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import sacrebleu

from ddlm_jax import progress

LN2 = float(np.log(2.0))
# How `held_out_elbo` picks its rows of the held-out split: evenly spread over it, or the first ones.
ROW_SELECTIONS = ("spread", "first")

# (params, rows int32[B, L], key, *per-row inputs [B, ...]) -> NELBO nats float32[B]; jitted by the caller.
NelboFn = Callable[..., jax.Array]


def ratio_stderr(numerators_N: np.ndarray, denominators_N: np.ndarray) -> float:
  """Standard error of sum(numerators) / sum(denominators) with the N pairs a random sample (the
  delta method): sqrt(N / (N - 1) * sum_i (y_i - R x_i)^2) / sum_i x_i, R the ratio. NaN for N < 2."""
  numerators_N, denominators_N = np.asarray(numerators_N, np.float64), np.asarray(denominators_N, np.float64)
  count = len(numerators_N)
  if count < 2:
    return math.nan
  ratio = numerators_N.sum() / denominators_N.sum()
  residuals_N = numerators_N - ratio * denominators_N
  return float(np.sqrt(count / (count - 1) * np.sum(residuals_N ** 2)) / denominators_N.sum())


@dataclasses.dataclass(frozen=True)
class ElboResult:
  """A held-out NELBO (an upper bound on the NLL), or the exact NLL of an autoregressive model.

  Attributes:
    bits_per_token: total NELBO (or NLL) in bits / total text tokens.
    stderr: Monte Carlo standard error of bits_per_token (0 for an exact NLL).
    num_sequences: sequences scored.
    num_samples: Monte Carlo draws per sequence: of (t, x_t), or with exact_time_sum of x_t at
      every step; 1 for an exact NLL.
    bits_per_sequence: float64[N], each sequence's NELBO (or NLL) in bits.
    tokens_per_sequence: int[N], each sequence's text tokens (the divisor).
    chars_per_sequence: int[N], each sequence's characters, when known.
    exact: bits_per_token is an exact NLL, not a bound.
    exact_time_sum: the bound summed every one of its T steps instead of drawing t.
    reference_bits_per_token: the data generator's exact NLL of the same documents (embedded
      corpus only), in bits per token with the same divisor; None when unknown.
    reference_bits_per_document: the same NLL, in mean bits per document.
  """
  bits_per_token: float
  stderr: float
  num_sequences: int
  num_samples: int
  bits_per_sequence: np.ndarray
  tokens_per_sequence: np.ndarray
  chars_per_sequence: np.ndarray | None = None
  exact: bool = False
  exact_time_sum: bool = False
  reference_bits_per_token: float | None = None
  reference_bits_per_document: float | None = None

  def __post_init__(self):
    if self.exact and self.exact_time_sum:
      raise ValueError("exact_time_sum sums the steps of a bound; an exact NLL (exact=True) has none")

  @property
  def num_tokens(self) -> int:
    """Text tokens scored, the divisor of bits_per_token."""
    return int(np.sum(self.tokens_per_sequence))

  @property
  def num_chars(self) -> int | None:
    """Characters of the scored texts, when known."""
    return None if self.chars_per_sequence is None else int(np.sum(self.chars_per_sequence))

  @property
  def bits_per_char(self) -> float | None:
    if not self.num_chars:
      return None
    return self.bits_per_token * self.num_tokens / self.num_chars

  @property
  def stderr_over_sequences(self) -> float:
    """Standard error of bits_per_token over the sequences as a sample (`ratio_stderr`): it
    includes the Monte Carlo noise, and is nonzero for an exact NLL too; NaN for one sequence."""
    return ratio_stderr(self.bits_per_sequence, self.tokens_per_sequence)

  @property
  def bits_per_char_stderr_over_sequences(self) -> float | None:
    """The same for bits_per_char; None without character counts."""
    if not self.num_chars:
      return None
    return ratio_stderr(self.bits_per_sequence, self.chars_per_sequence)

  @property
  def estimate(self) -> str:
    """What bits_per_token measures, in words."""
    if self.exact:
      return "exact NLL"
    return "NELBO, every step summed" if self.exact_time_sum else "NELBO, Monte Carlo over t"

  def summary(self) -> dict[str, Any]:
    summary = {"estimate": self.estimate, "bits_per_token": self.bits_per_token,
               "bits_per_token_stderr": self.stderr, "num_sequences": self.num_sequences,
               "num_tokens": self.num_tokens}
    if self.num_sequences > 1:
      summary["bits_per_token_stderr_over_sequences"] = self.stderr_over_sequences
    if not self.exact:
      summary["elbo_samples"] = self.num_samples
    if self.num_chars:
      summary["bits_per_char"] = self.bits_per_char
      if self.num_sequences > 1:
        summary["bits_per_char_stderr_over_sequences"] = self.bits_per_char_stderr_over_sequences
    if self.reference_bits_per_token is not None:
      summary["generator_bits_per_token"] = self.reference_bits_per_token
      summary["bits_per_document"] = float(self.bits_per_sequence.mean())
      summary["generator_bits_per_document"] = self.reference_bits_per_document
    return summary

  def describe(self) -> str:
    counts = f"{self.num_sequences} sequences, {self.num_tokens} tokens"
    if self.exact:
      text = f"held-out exact NLL: {self.bits_per_token:.4f} bits/token ({counts})"
    elif self.exact_time_sum:
      text = (f"held-out NELBO, every step of the bound summed: {self.bits_per_token:.4f} ± {self.stderr:.4f} "
              f"bits/token ({counts}, {self.num_samples} draws of x_t at each step)")
    else:
      text = (f"held-out NELBO: {self.bits_per_token:.4f} ± {self.stderr:.4f} bits/token "
              f"({counts}, {self.num_samples} draws of t each)")
    if self.num_sequences > 1:
      text += f"\n  ± {self.stderr_over_sequences:.4f} bits/token over sequences (Monte Carlo noise included)"
    if self.num_chars:
      text += f"\n  = {self.bits_per_char:.4f} bits/character ({self.num_chars} characters)"
      if self.num_sequences > 1:
        text += f" ± {self.bits_per_char_stderr_over_sequences:.4f} over sequences"
    if self.reference_bits_per_token is not None:
      text += (f"\ngenerator's exact NLL of the same documents: {self.reference_bits_per_token:.4f} bits/token"
               f" (gap {self.bits_per_token - self.reference_bits_per_token:+.4f})"
               f"\nper document: {'NLL' if self.exact else 'NELBO'} {self.bits_per_sequence.mean():.2f} bits, "
               f"generator's exact NLL {self.reference_bits_per_document:.2f} bits")
    return text


def elbo(nelbo_fn: NelboFn, params: Any, rows_NL: np.ndarray, num_tokens_N: np.ndarray, *,
         num_samples: int, batch_size: int, seed: int, batch_sharding=None, exact: bool = False,
         exact_time_sum: bool = False, row_inputs: Sequence[np.ndarray] = ()) -> ElboResult:
  """Monte Carlo NELBO of every row, in bits per text token.

  Args:
    nelbo_fn: jitted (params, rows_BL, key, *inputs_BL) -> nats_B, one draw of t per row.
    params: the model parameters passed through to nelbo_fn.
    rows_NL: int32[N, L] sequences (padded as in training).
    num_tokens_N: text tokens of each row, the divisor of bits per token.
    num_samples: draws per row (>= 2 for a standard error): of (t, x_t), or with exact_time_sum
      of x_t at every step.
    batch_size: rows per call; the last batch is padded and its padding dropped.
    seed: seed of the draws.
    batch_sharding: optional sharding of a batch on the device mesh (of the row inputs too).
    exact: nelbo_fn is an exact NLL (autoregressive): one pass, standard error 0.
    exact_time_sum: nelbo_fn sums every step of a discrete-time bound (draws only x_t); it
      labels the result.
    row_inputs: arrays [N, L] batched beside the rows and passed to nelbo_fn after the key (e.g.
      `experiment.make_nelbo_fn`'s fixed_NL and visible_NL).
  """
  if exact:
    num_samples = 1
  elif num_samples < 2:
    raise ValueError(f"the ELBO needs at least 2 Monte Carlo samples for its standard error, got {num_samples}")
  num_rows = len(rows_NL)
  if num_rows == 0:
    raise ValueError("no sequences to evaluate")
  mismatched = [np.shape(inputs_NL) for inputs_NL in row_inputs if len(inputs_NL) != num_rows]
  if mismatched:
    raise ValueError(f"row_inputs of shapes {mismatched} do not have the {num_rows} rows of rows_NL")
  padded = -(-num_rows // batch_size) * batch_size
  pad = lambda x_NL: np.concatenate([x_NL, np.repeat(x_NL[-1:], padded - num_rows, axis=0)])
  rows_PL, inputs_PL = pad(rows_NL), [pad(np.asarray(inputs_NL)) for inputs_NL in row_inputs]
  key = jax.random.key(seed)
  num_calls = num_samples * (padded // batch_size)
  bar = progress.bar(num_calls, "evaluate", "call", disable=num_calls < 2 or jax.process_index() != 0)
  nats = []  # device arrays, fetched once at the end
  for sample in range(num_samples):
    for start in range(0, padded, batch_size):
      batch = [x_PL[start:start + batch_size] for x_PL in (rows_PL, *inputs_PL)]
      if batch_sharding is not None:
        batch = [jax.device_put(x_BL, batch_sharding) for x_BL in batch]
      batch_BL, *inputs_BL = batch
      nats.append(nelbo_fn(params, batch_BL, jax.random.fold_in(jax.random.fold_in(key, sample), start),
                           *inputs_BL))
      if len(nats) > 1:  # one call queued behind the running one: the bar counts finished calls
        jax.block_until_ready(nats[-2])
        bar.update(1)
  nats_KN = np.asarray(jax.device_get(nats), np.float64).reshape(num_samples, padded)[:, :num_rows]
  bar.update(1)
  bar.close()
  tokens_N = np.asarray(num_tokens_N)
  mean_nats_N = nats_KN.mean(0)
  total_variance = 0.0 if exact else (nats_KN.var(0, ddof=1) / num_samples).sum()
  return ElboResult(bits_per_token=float(mean_nats_N.sum() / LN2 / tokens_N.sum()),
                    stderr=float(np.sqrt(total_variance) / LN2 / tokens_N.sum()),
                    num_sequences=num_rows, num_samples=num_samples, bits_per_sequence=mean_nats_N / LN2,
                    tokens_per_sequence=tokens_N, exact=exact, exact_time_sum=exact_time_sum)


def select_rows(num_rows: int, max_rows: int, rows: str = "spread") -> np.ndarray:
  """int[min(M, max_rows)] indices of the rows of a split of M that `held_out_elbo` scores:
  'spread', evenly spaced over the split (np.round(np.linspace(0, M - 1, max_rows)), distinct), or
  the 'first' max_rows; all of them when M <= max_rows."""
  if rows not in ROW_SELECTIONS:
    raise ValueError(f"config.eval.rows={rows!r} is not one of {ROW_SELECTIONS}")
  if max_rows < 1:
    raise ValueError(f"config.eval.max_docs must be >= 1, got {max_rows}")
  if num_rows <= max_rows or rows == "first":
    return np.arange(min(num_rows, max_rows))
  return np.round(np.linspace(0, num_rows - 1, max_rows)).astype(np.int64)


def held_out_elbo(nelbo_fn: NelboFn, params: Any, data, *, num_samples: int, batch_size: int,
                  max_rows: int, seed: int, batch_sharding=None, exact: bool = False,
                  exact_time_sum: bool = False, rows: str = "spread") -> ElboResult:
  """`elbo` of at most `max_rows` of a DataBundle's eval rows (chosen by `rows`, see
  `select_rows`), with the generator's exact NLL beside it when known.

  When the generator's log-probabilities are known, rows cut short by the sequence length
  (NaN log-probability) are left out, so both numbers cover exactly the same documents.
  """
  chosen = select_rows(len(data.eval_rows), max_rows, rows)
  rows_NL, num_tokens_N = data.eval_rows[chosen], data.eval_num_tokens[chosen]
  num_chars_N = data.eval_num_chars[chosen]
  log_probs_N = None if data.eval_log_probs is None else data.eval_log_probs[chosen]
  if log_probs_N is not None:
    whole_N = np.isfinite(log_probs_N)
    rows_NL, num_tokens_N, num_chars_N, log_probs_N = (
        rows_NL[whole_N], num_tokens_N[whole_N], num_chars_N[whole_N], log_probs_N[whole_N])
  result = elbo(nelbo_fn, params, rows_NL, num_tokens_N, num_samples=num_samples,
                batch_size=batch_size, seed=seed, batch_sharding=batch_sharding, exact=exact,
                exact_time_sum=exact_time_sum)
  result = dataclasses.replace(result, chars_per_sequence=np.asarray(num_chars_N))
  if log_probs_N is None:
    return result
  reference_bits_N = -log_probs_N / LN2
  return dataclasses.replace(result, reference_bits_per_token=float(reference_bits_N.sum() / result.num_tokens),
                             reference_bits_per_document=float(reference_bits_N.mean()))


@dataclasses.dataclass(frozen=True)
class SampleQuality:
  """How good a set of generated texts is.

  Attributes:
    num_samples: texts judged.
    unigram_entropy_bits: entropy of the texts' pooled token frequencies (bits per token).
    generative_perplexity: 2 ** (bits per token) of the texts under a trained autoregressive
      model (texts longer than its canvas cut to fit); None without one.
    well_formed_fraction: share of texts the corpus generator can parse; None off the corpus.
    generator_bits_per_document: the generator's exact NLL of the well-formed texts (mean bits).
  """
  num_samples: int
  unigram_entropy_bits: float
  generative_perplexity: float | None = None
  well_formed_fraction: float | None = None
  generator_bits_per_document: float | None = None

  def summary(self) -> dict[str, Any]:
    return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


def unigram_entropy_bits(token_lists: Sequence[Sequence[int]]) -> float:
  """Entropy in bits of the pooled token frequencies of `token_lists` (0 for no tokens)."""
  counts = np.array(list(collections.Counter(t for tokens in token_lists for t in tokens).values()), float)
  if not counts.size:
    return 0.0
  probs = counts / counts.sum()
  return float(-(probs * np.log2(probs)).sum())


def sample_quality(texts: Sequence[str], encode: Callable[[str], list[int]], *, ar_model=None,
                   corpus=None) -> SampleQuality:
  """Judges generated texts.

  Args:
    texts: the samples.
    encode: the tokenizer of the unigram entropy (the sampling model's).
    ar_model: a trained autoregressive `Pipeline` for the generative perplexity (texts longer than
      its canvas are cut to fit, so degenerate never-ending samples count too; empty samples, an
      [EOS] first, have no tokens to judge and count only in the parse rate); None skips it.
    corpus: a `RestaurantCorpus` to parse the texts and score them exactly; None off the corpus.
  """
  if not texts:
    raise ValueError("no samples to judge")
  quality = SampleQuality(num_samples=len(texts),
                          unigram_entropy_bits=unigram_entropy_bits([encode(text) for text in texts]))
  judged = [text for text in texts if text.strip()]
  if ar_model is not None and judged:
    bits_per_token = ar_model.score(judged, truncate=True).bits_per_token
    quality = dataclasses.replace(quality, generative_perplexity=2.0 ** bits_per_token)
  if corpus is not None:
    log_probs = [corpus.log_prob(text) for text in texts]
    well_formed = [log_prob for log_prob in log_probs if log_prob > -math.inf]
    quality = dataclasses.replace(
        quality, well_formed_fraction=len(well_formed) / len(texts),
        generator_bits_per_document=-float(np.mean(well_formed)) / LN2 if well_formed else None)
  return quality


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
  """Corpus BLEU in [0, 100] of each hypothesis against its one reference (sacrebleu's defaults)."""
  if len(hypotheses) != len(references) or not hypotheses:
    raise ValueError(f"need as many hypotheses as references, at least one; got {len(hypotheses)} "
                     f"and {len(references)}")
  return sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score


def mbr_select(candidates: Sequence[str]) -> int:
  """Index of the minimum-Bayes-risk candidate among outputs for one source (DiffuSeq's MBR).

  Each candidate's utility is its mean sentence BLEU against the other candidates, smoothed
  ('exp', effective order) so that short texts do not all score 0; the most central one wins,
  the lowest index among ties. One candidate gives 0.
  """
  if not candidates:
    raise ValueError("no candidates to choose from")
  metric = sacrebleu.metrics.BLEU(effective_order=True)
  utilities = [sum(metric.sentence_score(candidate, [other]).score
                   for j, other in enumerate(candidates) if j != i)
               for i, candidate in enumerate(candidates)]
  return int(np.argmax(utilities))  # The first maximum; the mean's divisor is the same for all.


def attribute_accuracy(predicted: Sequence[Mapping[str, str] | None],
                       truth: Sequence[Mapping[str, str]]) -> dict[str, float]:
  """How well predicted records (None: not well formed) match the true ones.

  Returns:
    'exact_match': share of rows whose prediction equals the true record exactly.
    'attribute_accuracy': share of the true (row, attribute, value) triples the predictions
      recover; a None prediction recovers none of its row's.
    'well_formed': share of predictions that are not None.
  """
  if len(predicted) != len(truth) or not truth:
    raise ValueError(f"need as many predictions as true records, at least one; got "
                     f"{len(predicted)} and {len(truth)}")
  recovered = sum(prediction is not None and prediction.get(attribute) == value
                  for prediction, record in zip(predicted, truth) for attribute, value in record.items())
  num_attributes = sum(len(record) for record in truth)
  return {
      "exact_match": sum(prediction is not None and dict(prediction) == dict(record)
                         for prediction, record in zip(predicted, truth)) / len(truth),
      "attribute_accuracy": recovered / num_attributes if num_attributes else math.nan,
      "well_formed": sum(prediction is not None for prediction in predicted) / len(truth),
  }
