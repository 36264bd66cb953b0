"""Starting a run from another run's parameters (config.init_from): what is carried over, what is
refused before anything is written, and the provenance every checkpoint and summary records."""
import os
import sys

import jax
import numpy as np
import pytest

from ddlm_jax import checkpoint
from ddlm_jax import pipeline
from ddlm_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import ar_tiny  # pylint: disable=g-import-not-at-top
from experiments import mdlm_tiny  # pylint: disable=g-import-not-at-top


def tiny(module, **train_overrides):
  config = module.get_config()
  config.data.update(num_train_docs=200, seq_len=64)
  config.train.update({"num_steps": 2, "checkpoint_every": 2, **train_overrides})
  config.eval.update(max_docs=16)
  return config


@pytest.fixture(scope="module")
def ar_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ar"))
  train.train_and_evaluate(tiny(ar_tiny), workdir)
  return workdir


def assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_masked_run_starts_from_the_autoregressive_parameters(ar_workdir, tmp_path):
  config = tiny(mdlm_tiny, num_steps=1, warmup_steps=10)  # the first step's learning rate is 0
  config.init_from = ar_workdir
  summary = train.train_and_evaluate(config, str(tmp_path / "masked"))
  assert summary["init_from"] == {"workdir": os.path.abspath(ar_workdir), "step": 2, "params": "raw",
                                  "process": "autoregressive"}
  masked, ar = pipeline.load(str(tmp_path / "masked")), pipeline.load(ar_workdir)
  assert_same_params(masked.params, ar.params)
  assert masked.tokenizer.model_proto == ar.tokenizer.model_proto
  assert masked.provenance == summary["init_from"] and ar.provenance == {}
  manager = checkpoint.make_manager(str(tmp_path / "masked"), read_only=True)
  assert checkpoint.read_provenance(manager, 1) == summary["init_from"]


def test_provenance_survives_resuming_and_chains(ar_workdir, tmp_path):
  config = tiny(mdlm_tiny)
  config.init_from = ar_workdir
  first = train.train_and_evaluate(config, str(tmp_path / "masked"))
  config.train.num_steps = 4
  resumed = train.train_and_evaluate(config, str(tmp_path / "masked"))
  assert resumed["step"] == 4 and resumed["init_from"] == first["init_from"]
  again = tiny(mdlm_tiny)
  again.init_from = str(tmp_path / "masked")
  chained = train.train_and_evaluate(again, str(tmp_path / "again"))
  assert chained["init_from"]["step"] == 4 and chained["init_from"]["from"] == first["init_from"]


@pytest.mark.parametrize("change,message", [
    (dict(model=dict(embed_dim=64)), r"other parameters than this one .*embed_dim: 32 there, 64 here"),
    (dict(model=dict(time_conditioning=True)), r"other parameters.*time_conditioning: False there, True here"),
    (dict(data=dict(tokenizer="char")), r"asks for tokenizer 'char'.* has 'sentencepiece' of vocab_size 1024"),
    (dict(data=dict(vocab_size=512)), r"of vocab_size 512.* of vocab_size 1024"),
])
def test_a_mismatched_start_is_refused_before_anything_is_written(ar_workdir, tmp_path, change, message):
  config = tiny(mdlm_tiny)
  config.init_from = ar_workdir
  for group, values in change.items():
    config[group].update(values)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "new"))
  assert not os.path.exists(tmp_path / "new")


def test_a_start_from_a_workdir_without_a_checkpoint_is_refused(tmp_path):
  config = tiny(mdlm_tiny)
  config.init_from = str(tmp_path / "nothing")
  with pytest.raises(ValueError, match="holds no checkpoint"):
    train.train_and_evaluate(config, str(tmp_path / "new"))
  config.init_from = str(tmp_path / "new")
  os.makedirs(tmp_path / "new" / "checkpoints" / "tmp")  # an empty manager directory: still no checkpoint
  with pytest.raises(ValueError, match="holds no checkpoint"):
    train.train_and_evaluate(config, str(tmp_path / "new"))


def test_a_char_alphabet_that_misses_a_character_of_the_new_texts_is_refused(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("\n\n".join(f"The boat number {i} sails north." for i in range(40)))
  first = tiny(mdlm_tiny)
  first.data.update(source="text_files", paths=(str(path),), tokenizer="char", seq_len=48)
  train.train_and_evaluate(first, str(tmp_path / "first"))
  path.write_text("\n\n".join(f"The boat number {i} sails north \u03a9." for i in range(40)))
  config = tiny(mdlm_tiny)
  config.data.update(first.data.to_dict())
  config.init_from = str(tmp_path / "first")
  with pytest.raises(ValueError, match="char tokenizer of config.init_from has no id for 1 character"):
    train.train_and_evaluate(config, str(tmp_path / "second"))
  assert not os.path.exists(tmp_path / "second" / "tokenizer")
