"""Supervised fine-tuning from a pretrained checkpoint: the instruction pairs, what the jitted bound
scores of a pair row (the response and its [EOS], never the prompt), and SFT end to end."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddlm_jax import config as config_lib
from ddlm_jax import experiment as experiment_lib
from ddlm_jax import pipeline
from ddlm_jax import train
from ddlm_jax.data import corpus
from ddlm_jax.data import datasets
from ddlm_jax.data import pairs
from ddlm_jax.networks import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import compare  # pylint: disable=g-import-not-at-top
from experiments import mdlm_tiny  # pylint: disable=g-import-not-at-top
from experiments import sft  # pylint: disable=g-import-not-at-top


def test_sft_configs_keep_the_pretrained_network():
  for family in sft.FAMILIES:
    assert sft.get_config(family).model.to_dict() == compare.get_config(family).model.to_dict()
    assert sft.get_config(family).init_from == f"workdirs/compare/{family}_embedded"


def test_instruction_pairs_ask_for_both_directions(tmp_path):
  config = datasets.DataConfig(task="instructions", num_train_docs=50, num_eval_docs=6, seq_len=160)
  data = datasets.load_data(config, str(tmp_path))
  for index, (source, target, record) in enumerate(zip(data.eval_sources, data.eval_targets, data.eval_records)):
    if index % 2 == 0:
      assert source == datasets.INSTRUCTIONS["data_to_text"] + corpus.format_record(record)
      assert corpus.parse_record(target) is None  # a description
    else:
      assert source.startswith(datasets.INSTRUCTIONS["text_to_data"]) and corpus.parse_record(target) == record
  prompt_ML = pairs.source_mask(data.eval_rows, data.tokenizer.eos_id)
  for row, prompt, source in zip(data.eval_rows, prompt_ML, data.eval_sources):
    assert data.tokenizer.decode(row[prompt]) == source


def test_the_jitted_bound_scores_the_response_and_its_eos_never_the_prompt():
  config = sft.get_config("ar")
  config.model.update(num_layers=1, embed_dim=16, num_heads=2, mlp_dim=16)
  vocab_size = 40
  experiment = experiment_lib.make_experiment(config, vocab_size)
  graphdef, params = nnx.split(transformer.Transformer(experiment.model, rngs=nnx.Rngs(0)), nnx.Param)
  nelbo_fn = experiment_lib.make_nelbo_fn(graphdef, experiment.process, pairs=True)
  eos, pad = 3, 0
  row = np.full((1, 128), pad, np.int32)
  row[0, :6] = [10, 11, 12, eos, 20, 21]
  row[0, 6] = eos
  nats = float(nelbo_fn(params, jnp.asarray(row), jax.random.key(0))[0])
  inputs_BL = experiment.process.inputs(jnp.asarray(row))
  log_probs = experiment.process.next_token_log_probs(nnx.merge(graphdef, params)(inputs_BL))[0]
  by_hand = -sum(float(log_probs[i, row[0, i]]) for i in range(4, 128))  # response, [EOS], padding
  np.testing.assert_allclose(nats, by_hand, rtol=1e-5)
  other_eos = row.copy()
  other_eos[0, 6] = 22
  assert float(nelbo_fn(params, jnp.asarray(other_eos), jax.random.key(0))[0]) != nats  # the [EOS] is scored


def test_sft_from_a_pretrained_language_model_answers_prompts(tmp_path):
  pretrained = mdlm_tiny.get_config()
  pretrained.data.update(num_train_docs=200, seq_len=64)
  pretrained.train.update(num_steps=2, checkpoint_every=2)
  pretrained.eval.update(max_docs=16)
  train.train_and_evaluate(pretrained, str(tmp_path / "lm"))
  config = sft.get_config("mdlm")
  config.data.update(num_train_docs=200, num_eval_docs=16, vocab_size=pretrained.data.vocab_size)
  config.model.update(pretrained.model.to_dict())
  config.train.update(batch_size=16, num_steps=2, checkpoint_every=2)
  config.eval.update(batch_size=16, max_docs=16, elbo_samples=2)
  config.init_from = str(tmp_path / "lm")
  config_lib.validate(config)
  summary = train.train_and_evaluate(config, str(tmp_path / "sft"))
  assert summary["init_from"]["workdir"] == str(tmp_path / "lm") and np.isfinite(summary["bits_per_token"])
  model = pipeline.load(str(tmp_path / "sft"))
  answers = model.translate([datasets.INSTRUCTIONS["data_to_text"] + "name: The Golden Lantern | food: Italian"] * 2,
                            steps=8)
  assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
