"""The reversal evaluation: the halves, the 'completion' instruction pairs, and both formats on tiny
models (what each direction fixes, what it asks for, what it scores)."""
import os
import sys
import types

import numpy as np
import pytest

from ddlm_jax import pipeline
from ddlm_jax import reversal
from ddlm_jax import train
from ddlm_jax.data import corpus
from ddlm_jax.data import datasets
from ddlm_jax.data import pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import mdlm_tiny  # pylint: disable=g-import-not-at-top
from experiments import reversal as reversal_runs  # pylint: disable=g-import-not-at-top

DOCUMENTS = [document.text for document in corpus.default_corpus().sample(4, corpus.split_seed("train", 0))]


def test_split_in_halves_cuts_at_the_space_nearest_the_middle():
  assert pairs.split_in_halves("aa bb cc dd") == ("aa bb", "cc dd")
  assert pairs.split_in_halves("abcdef g hi") == ("abcdef", "g hi")
  for document in DOCUMENTS:
    before, after = pairs.split_in_halves(document)
    assert f"{before} {after}" == document and abs(len(before) - len(after)) <= max(map(len, document.split()))
  with pytest.raises(ValueError, match="no space"):
    pairs.split_in_halves("word ")


def test_completion_pairs_ask_for_the_half_after_and_the_half_before_in_turn(tmp_path):
  config = datasets.DataConfig(task="completion", num_train_docs=20, num_eval_docs=4, seq_len=128)
  data = datasets.load_data(config, str(tmp_path))
  texts = [document.text for document in corpus.default_corpus().sample(4, corpus.split_seed("validation", 0))]
  for index, (source, target, text) in enumerate(zip(data.eval_sources, data.eval_targets, texts)):
    before, after = pairs.split_in_halves(text)
    direction = ("forward", "reversal")[index % 2]
    given, missing = (before, after) if direction == "forward" else (after, before)
    assert (source, target) == (datasets.INSTRUCTIONS[direction] + given, missing)
  prompt_ML = pairs.source_mask(data.eval_rows, data.tokenizer.eos_id)
  for row, prompt, source in zip(data.eval_rows, prompt_ML, data.eval_sources):
    assert data.tokenizer.decode(row[prompt]) == source  # the prompt is the fixed, unscored part


def test_exact_match_compares_whole_answers():
  result = reversal.Completions("forward", "instruction", ("a b", "a  b ", "a"), ("a b", "a b", "a b"))
  assert result.exact_match == pytest.approx(2 / 3)
  assert result.summary()["exact_match"] == pytest.approx(0.6667)


def test_a_zero_shot_canvas_may_go_on_after_the_document():
  outputs = ("a b. c", "a b.", "a b.c", "a b", "x a b.")
  result = reversal.Completions("forward", "zero_shot", outputs, ("a b.",) * len(outputs))
  assert result.exact_match == pytest.approx(2 / 5)  # a canvas goes on after a space, never inside a word
  assert reversal.Completions("forward", "instruction", outputs[:1], ("a b.",)).exact_match == 0.0


def test_reversal_configs_evaluate_documents_that_fine_tuning_never_asked_about():
  pretraining = reversal_runs.get_config("mdlm")
  fine_tuning = reversal_runs.get_config("mdlm,sft")
  assert pretraining.data.num_train_docs == reversal_runs.NUM_DOCUMENTS
  assert fine_tuning.data.num_train_docs == reversal_runs.NUM_SFT_DOCUMENTS < reversal_runs.NUM_DOCUMENTS
  assert fine_tuning.init_from == f"{reversal_runs.ROOT}/mdlm" and fine_tuning.data.task == "completion"
  assert reversal_runs.get_config("adapted,sft").model.shift_logits
  # The sampled documents are a prefix of a longer sample: fine-tuning's are pretraining's first ones.
  generator, seed = corpus.default_corpus(), corpus.split_seed("train", pretraining.data.seed)
  assert [doc.text for doc in generator.sample(5, seed)] == [doc.text for doc in generator.sample(8, seed)[:5]]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
  """A tiny masked language model (3 steps) and its fine-tuning on task 'completion' (2 steps)."""
  root = tmp_path_factory.mktemp("reversal")
  config = mdlm_tiny.get_config()
  config.data.update(num_train_docs=64, num_eval_docs=8, seq_len=64)
  config.train.update(num_steps=3, checkpoint_every=3)
  config.eval.update(max_docs=8)
  train.train_and_evaluate(config, str(root / "lm"))
  config.init_from = str(root / "lm")
  config.data.update(task="completion", seq_len=96)
  config.train.update(num_steps=2, checkpoint_every=2)
  train.train_and_evaluate(config, str(root / "sft"))
  return pipeline.load(str(root / "lm")), pipeline.load(str(root / "sft"))


def test_zero_shot_fixes_the_given_half_where_the_document_has_it(tiny_models):
  model, _ = tiny_models
  forward = reversal.zero_shot(model, DOCUMENTS, "forward")
  backward = reversal.zero_shot(model, DOCUMENTS, "reversal")
  assert forward.expected == backward.expected == tuple(DOCUMENTS) and len(backward.outputs) == len(DOCUMENTS)
  assert all(output.startswith(pairs.split_in_halves(document)[0])
             for document, output in zip(DOCUMENTS, forward.outputs))
  asked = []
  spy = types.SimpleNamespace(config=model.config, process=model.process, tokenizer=model.tokenizer,
                              seq_len=model.seq_len, generate=lambda *args, **kwargs: asked.append(kwargs) or DOCUMENTS)
  reversal.zero_shot(spy, DOCUMENTS, "reversal")
  halves = [pairs.split_in_halves(document) for document in DOCUMENTS]
  # The later half is fixed after as many positions as the earlier half has tokens; the rest is generated.
  assert asked[0]["constraints"] == [{len(model.tokenizer.encode(before)): after} for before, after in halves]
  assert asked[0]["temperature"] == 0 and asked[0]["strategy"] == "low_confidence"
  with pytest.raises(ValueError, match="direction"):
    reversal.zero_shot(model, DOCUMENTS, "sideways")


def test_a_left_to_right_model_gets_no_zero_shot_reversal(tiny_models):
  model, _ = tiny_models
  causal = types.SimpleNamespace(config=model.config, process=types.SimpleNamespace(causal_network=True))
  with pytest.raises(ValueError, match="left-to-right"):
    reversal.zero_shot(causal, DOCUMENTS, "reversal")


def test_instruction_format_answers_and_scores_the_missing_half(tiny_models):
  language_model, model = tiny_models
  forward = reversal.instruction(model, DOCUMENTS, "forward", num_samples=2)
  backward = reversal.instruction(model, DOCUMENTS, "reversal", num_samples=2)
  halves = [pairs.split_in_halves(document) for document in DOCUMENTS]
  assert forward.expected == tuple(after for _, after in halves)
  assert backward.expected == tuple(before for before, _ in halves)
  assert len(forward.outputs) == len(DOCUMENTS) and np.isfinite([forward.bits_per_token, backward.bits_per_token]).all()
  prompts = [datasets.INSTRUCTIONS["reversal"] + after for _, after in halves]
  by_hand = model.score([before for before, _ in halves], sources=prompts, eos=True, num_samples=2)
  assert backward.bits_per_token == pytest.approx(by_hand.bits_per_token, abs=1e-4)
  with pytest.raises(ValueError, match="fine-tuned on task 'completion'"):
    reversal.instruction(language_model, DOCUMENTS, "forward")
  with pytest.raises(ValueError, match="language model"):
    reversal.zero_shot(model, DOCUMENTS, "forward")
