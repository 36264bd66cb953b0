"""Every family through the same launcher path and API: train, resume-free load, sample, score."""
import itertools
import os
import sys

import numpy as np
import pytest

import ddlm_jax
from ddlm_jax import config as config_lib
from ddlm_jax import experiment as experiment_lib
from ddlm_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import ar_tiny  # pylint: disable=g-import-not-at-top
from experiments import bd3lm_tiny  # pylint: disable=g-import-not-at-top
from experiments import compare  # pylint: disable=g-import-not-at-top
from experiments import d3pm_absorbing_tiny  # pylint: disable=g-import-not-at-top
from experiments import d3pm_uniform_tiny  # pylint: disable=g-import-not-at-top
from experiments import udlm_tiny  # pylint: disable=g-import-not-at-top

TINY = {"udlm": udlm_tiny, "d3pm_absorbing": d3pm_absorbing_tiny, "d3pm_uniform": d3pm_uniform_tiny,
        "ar": ar_tiny, "bd3lm": bd3lm_tiny}


def short(config):
  config.train.update(num_steps=12, checkpoint_every=12, log_every=6)
  config.eval.update(max_docs=16)
  return config


@pytest.mark.parametrize("family", sorted(TINY))
def test_family_trains_samples_and_scores_through_the_shared_api(tmp_path, family):
  config = short(TINY[family].get_config())
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["step"] == 12 and np.isfinite(summary["bits_per_token"])
  assert summary["bits_per_token"] > summary["generator_bits_per_token"]  # a bound (or an NLL) of a poor model
  assert summary["estimate"] == ("exact NLL" if family == "ar" else "NELBO, Monte Carlo over t")
  model = ddlm_jax.load(str(tmp_path))
  assert model.process.causal_network == (family == "ar")
  texts = model.generate(["The"], steps=8, seed=0)
  assert texts[0].startswith("The")
  if family == "bd3lm":  # block by block over the exact cache, stopping at the window of [EOS]
    short_texts = model.generate(["The", "A pub"], max_new_tokens=6, seed=0)
    assert short_texts[0].startswith("The") and short_texts[1].startswith("A pub")
  documents = ["The Golden Lantern is a pub.", "zzzz qqqq"]
  scores = model.score(documents, num_samples=2)
  assert np.isfinite(scores.bits_per_sequence).all()
  if family == "ar":  # one pass, no Monte Carlo: another seed gives the very same NLL
    again = model.score(documents, num_samples=3, seed=1)
    assert scores.stderr == again.stderr == 0.0 and scores.num_samples == again.num_samples == 1
    np.testing.assert_array_equal(again.bits_per_sequence, scores.bits_per_sequence)
  if family == "d3pm_absorbing":  # the bound summed over all T steps instead of one drawn step
    exact = model.evaluate(str(tmp_path), num_samples=2, exact_time_sum=True, max_docs=2)
    assert np.isfinite(exact.bits_per_token) and exact.num_sequences <= 2
    assert exact.exact_time_sum and "every step of the bound summed" in exact.describe()


def test_nearest_neighbor_d3pm_builds_saves_and_reloads_its_graph(tmp_path):
  config = short(d3pm_uniform_tiny.get_config())
  config.process.update(transition="nearest_neighbor", num_neighbors=4, neighbor_embed_dim=8)
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(summary["bits_per_token"])
  assert os.path.exists(experiment_lib.neighbor_graph_path(str(tmp_path)))
  model = ddlm_jax.load(str(tmp_path))
  assert model.process.graph is not None
  assert len(model.generate(num_samples=2, steps=4)) == 2
  # A graph saved under other settings is rebuilt, never silently reused.
  config.process.num_neighbors = 2
  rows_NL = np.tile(np.arange(model.tokenizer.vocab_size), (2, 1))
  graph = experiment_lib.build_neighbor_graph(config, rows_NL, model.tokenizer.vocab_size, str(tmp_path))
  assert graph.neighbors_VK.shape[1] == 2
  assert experiment_lib.load_neighbor_graph(str(tmp_path)).neighbors_VK.shape[1] == 2


@pytest.mark.parametrize("overrides,message", [
    (dict(name="d3pm", transition="gaussian"), "transition"),
    (dict(name="d3pm", num_steps=0), "num_steps"),
    (dict(name="diffusion"), "process.name"),
])
def test_bad_process_settings_fail_at_start_up(overrides, message):
  config = compare.get_config("mdlm")
  config.process.update(**overrides)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_exact_time_sum_needs_a_discrete_time_process():
  config = compare.get_config("udlm")
  config.eval.exact_time_sum = True
  with pytest.raises(ValueError, match="exact_time_sum"):
    config_lib.validate(config)


def test_a_config_saved_by_an_older_version_gets_todays_defaults():
  saved = compare.get_config("mdlm").to_dict()
  del saved["process"]["transition"], saved["eval"]["exact_time_sum"]
  config = config_lib.with_defaults(saved)
  assert config.process.transition == "absorbing" and config.eval.exact_time_sum is False
  masked_identity = {"type": "MaskedDiffusion", "mask_id": 1, "schedule": {"kind": "linear", "eps": 1e-3},
                     "antithetic_time": True}
  assert config_lib.run_identity(config)["process"] == masked_identity
  # Checkpoints that recorded every process setting still resume.
  saved_identity = {**config_lib.run_identity(config), "process": compare.get_config("mdlm").process.to_dict()}
  assert config_lib.saved_run_identity(saved_identity) == config_lib.run_identity(config)


@pytest.mark.parametrize("top_k,top_p,message", [(0, 1.0, "top_k"), (None, 0.0, "top_p"), (None, 1.5, "top_p")])
def test_bad_decoding_settings_fail_at_start_up(top_k, top_p, message):
  config = compare.get_config("ar")
  config.sample.update(top_k=top_k, top_p=top_p)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_mask_revealing_strategies_need_an_absorbing_process():
  config = compare.get_config("udlm")
  config.sample.strategy = "low_confidence"
  with pytest.raises(ValueError, match="no \\[MASK\\] state"):
    config_lib.validate(config)
  config = compare.get_config("d3pm_absorbing")
  config.sample.strategy = "low_confidence"
  config_lib.validate(config)


def test_every_compare_variant_is_a_valid_config():
  for family in compare.FAMILIES:
    for dataset, size in itertools.product(compare.DATASETS, compare.SIZES):
      config = compare.get_config(f"{family},{dataset},{size}")
      if dataset == "shakespeare":
        config.data.paths = ("input.txt",)
      config_lib.validate(config)
  with pytest.raises(ValueError, match="unknown variant"):
    compare.get_config("gpt")
