"""Exact checks of the embedded corpus: enumerated tiny grammars, scoring, parsing, entropy."""
import collections
import math
import re

import numpy as np
import pytest

from ddlm_jax.data import corpus

# Tiny grammars small enough to enumerate; together they use every optional attribute, every
# phrasing and frame, and every layout of up to two clauses.
TINY_SETTINGS = (
    ("atmosphere", "near", "price_range"),
    ("price_range", "family_friendly"),
    ("customer_rating", "signature_dish"),
)


@pytest.fixture(scope="module", params=TINY_SETTINGS, ids="+".join)
def tiny(request):
  grammar = corpus.RestaurantCorpus(optional_attributes=request.param, tiny=True)
  return grammar, list(grammar.enumerate_documents())


@pytest.fixture(scope="module")
def default_samples():
  return corpus.default_corpus().sample(20_000, seed=7)


def test_tiny_grammar_gives_every_text_one_derivation(tiny):
  _, documents = tiny
  counts = collections.Counter(document.text for document in documents)
  assert len(documents) > 300
  assert counts.most_common(1)[0][1] == 1


def test_tiny_probabilities_sum_to_one(tiny):
  _, documents = tiny
  assert abs(math.fsum(math.exp(document.log_prob) for document in documents) - 1.0) < 1e-9


def test_entropy_bits_equals_entropy_of_enumeration(tiny):
  grammar, documents = tiny
  bits = -math.fsum(math.exp(d.log_prob) * d.log_prob for d in documents) / math.log(2)
  assert abs(grammar.entropy_bits() - bits) < 1e-9


def test_num_documents_equals_size_of_enumeration(tiny):
  grammar, documents = tiny
  assert grammar.num_documents() == len({document.text for document in documents})


def test_scorer_and_parser_agree_with_enumeration(tiny):
  grammar, documents = tiny
  for document in documents:
    assert grammar.log_prob(document.text) == pytest.approx(document.log_prob, abs=1e-12)
    assert grammar.parse(document.text) == document.record


def test_tiny_samples_follow_enumerated_probabilities():
  grammar = corpus.RestaurantCorpus(optional_attributes=("atmosphere", "near"), tiny=True)
  probs = {d.text: math.exp(d.log_prob) for d in grammar.enumerate_documents()}
  num_samples = 20_000
  counts = collections.Counter(d.text for d in grammar.sample(num_samples, seed=0))
  assert set(counts) <= set(probs)
  chi_square = sum((counts[text] - num_samples * p)**2 / (num_samples * p) for text, p in probs.items())
  dof = len(probs) - 1
  assert chi_square < dof + 6 * math.sqrt(2 * dof)


def test_presence_prob_is_the_share_of_documents_mentioning_each_optional_attribute():
  attributes = ("near", "price_range")
  grammar = corpus.RestaurantCorpus(optional_attributes=attributes, presence_prob=0.8, tiny=True)
  documents = list(grammar.enumerate_documents())
  samples = grammar.sample(4000, seed=1)
  for attribute in attributes:
    mentioned = math.fsum(math.exp(d.log_prob) for d in documents if attribute in d.record)
    assert abs(mentioned - 0.8) < 1e-9, attribute
    share = np.mean([attribute in d.record for d in samples])
    assert abs(share - 0.8) < 5 * math.sqrt(0.8 * 0.2 / len(samples)), attribute


def test_sample_is_reproducible_and_depends_on_seed():
  grammar = corpus.default_corpus()
  first = grammar.sample(200, seed=3)
  assert first == grammar.sample(200, seed=3)
  assert [d.text for d in first] != [d.text for d in grammar.sample(200, seed=4)]
  assert len({d.text for d in first}) > 190


def test_sampled_log_prob_equals_score_of_text(default_samples):
  """log_prob sums over every derivation of a text, so equality also rules out a second one."""
  grammar = corpus.default_corpus()
  for document in default_samples[:3000]:
    assert grammar.log_prob(document.text) == document.log_prob
    assert grammar.parse(document.text) == document.record


def test_documents_are_clean_ascii_with_sentences_of_10_to_60_words(default_samples):
  sentence_counts = collections.Counter()
  for document in default_samples:
    text = document.text
    assert all(" " <= char <= "~" for char in text), text
    assert text == text.strip() and "  " not in text, text
    sentences = re.split(r"(?<=\.) ", text)
    sentence_counts[len(sentences)] += 1
    for sentence in sentences:
      assert sentence.endswith(".") and 10 <= len(sentence.split()) <= 60, sentence
  assert set(sentence_counts) == {1, 2, 3}


def test_vocabulary_has_at_least_500_words(default_samples):
  words = {word.lower() for d in default_samples for word in re.findall(r"[A-Za-z']+", d.text)}
  assert len(words) >= 500


def test_monte_carlo_bits_agree_with_entropy_bits(default_samples):
  bits = -np.array([document.log_prob for document in default_samples]) / np.log(2)
  standard_error = bits.std() / np.sqrt(len(bits))
  assert abs(bits.mean() - corpus.default_corpus().entropy_bits()) < 4 * standard_error


def test_records_hold_known_values_and_every_required_attribute(default_samples):
  values = corpus.default_corpus().attribute_values()
  assert set(values) == set(corpus.REQUIRED_ATTRIBUTES + corpus.OPTIONAL_ATTRIBUTES)
  for document in default_samples[:2000]:
    assert set(corpus.REQUIRED_ATTRIBUTES) <= set(document.record)
    assert all(value in values[attribute] for attribute, value in document.record.items())


def _corruptions(text):
  words = text.split(" ")
  yield " ".join([words[1], words[0]] + words[2:])  # Two words swapped.
  yield text[:-1]  # Final full stop dropped.
  yield " ".join(words[:-2] + words[-1:])  # A word dropped, the full stop kept.
  yield " ".join(words[:-1] + ["indeed", words[-1]])  # An extra word.
  yield text.lower()
  yield text + " "
  yield text.replace(" ", "\n", 1)


def test_corrupted_texts_have_zero_probability(default_samples):
  grammar = corpus.default_corpus()
  for document in default_samples[:300]:
    for corrupted in _corruptions(document.text):
      assert grammar.log_prob(corrupted) == -math.inf, corrupted
      assert grammar.parse(corrupted) is None, corrupted
  for text in ("", ".", "Hello world."):
    assert grammar.log_prob(text) == -math.inf


def test_default_corpus_has_millions_of_documents():
  grammar = corpus.default_corpus()
  # Every combination of values is a record of some text, and parse maps each text to one record.
  num_records = 1
  for attribute, values in grammar.attribute_values().items():
    num_records *= len(values) + (attribute in corpus.OPTIONAL_ATTRIBUTES)
  assert num_records >= 10**6
  assert grammar.num_documents() >= num_records


def test_split_seeds_are_distinct():
  seeds = {corpus.split_seed(split, seed) for split in ("train", "validation", "test")
           for seed in range(100)}
  assert len(seeds) == 300
  with pytest.raises(ValueError, match="split must be one of"):
    corpus.split_seed("dev")
  with pytest.raises(ValueError, match="seed must be non-negative"):
    corpus.split_seed("train", -1)


@pytest.mark.parametrize("settings, setting", [
    ({"optional_attributes": ("near", "colour")}, "optional_attributes"),
    ({"optional_attributes": ("near", "near")}, "optional_attributes"),
    ({"presence_prob": 1.0}, "presence_prob"),
    ({"presence_prob": 0.0}, "presence_prob"),
])
def test_invalid_settings_raise_naming_the_setting(settings, setting):
  with pytest.raises(ValueError, match=setting):
    corpus.RestaurantCorpus(**settings)


def test_records_round_trip_through_their_serialisation(default_samples):
  for document in default_samples[:2000]:
    line = corpus.format_record(document.record)
    assert corpus.parse_record(line) == document.record
    assert "\n" not in line
  record = {"area": "riverside", "name": "The Golden Lantern", "food": "Italian",
            "eat_type": "coffee shop", "price_range": "low"}
  assert corpus.format_record(record) == ("name: The Golden Lantern | eat_type: coffee shop | "
                                          "food: Italian | area: riverside | price_range: low")
  assert corpus.parse_record("  food :Italian|name:  Rossi's Fig  ") is None  # No ": " after food.
  assert corpus.parse_record(" food : Italian|name:  Rossi's Fig ") == {"food": "Italian",
                                                                        "name": "Rossi's Fig"}


def test_format_record_writes_the_chosen_attributes_it_has():
  record = {"name": "The Golden Lantern", "eat_type": "pub", "food": "Thai", "area": "seafront"}
  assert corpus.format_record(record, ("near", "food", "name")) == "name: The Golden Lantern | food: Thai"
  assert corpus.format_record(record, ("near",)) == ""
  with pytest.raises(ValueError, match="unknown attributes \\['colour'\\]"):
    corpus.format_record(record, ("colour",))


def test_attribute_labels_index_the_values_and_mark_missing_attributes():
  reference = corpus.default_corpus()
  values = reference.attribute_values()
  records = [{"food": "Thai", "area": "seafront"}, {"food": "Italian"}]
  labels_NA = reference.attribute_labels(records, ["area", "food"])
  np.testing.assert_array_equal(labels_NA, [[values["area"].index("seafront"), values["food"].index("Thai")],
                                            [-1, values["food"].index("Italian")]])
  assert reference.attribute_labels([], ["food"]).shape == (0, 1)


@pytest.mark.parametrize("text", [
    "", "   ", "name: The Fox |", "name The Fox", "name: The Fox | colour: red",
    "name: The Fox | name: The Owl", "name: ", "food: Thai | | area: seafront",
])
def test_parse_record_rejects_malformed_lines(text):
  assert corpus.parse_record(text) is None
