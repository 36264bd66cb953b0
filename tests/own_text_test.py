"""A user's own text file, the text8/enwik8 way, through the launcher and `train_and_evaluate`: a
character split of one stream, random training windows that resume exactly, and held-out windows
scored in bits per character with the error over windows."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ddlm_jax import checkpoint
from ddlm_jax import pipeline
from ddlm_jax import train
from ddlm_jax.data import batching

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import char_stream  # pylint: disable=g-import-not-at-top

SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")
# The launcher flags that shrink char_stream to a few seconds.
TINY_FLAGS = ("--config.data.seq_len=32", "--config.model.num_layers=1", "--config.model.num_heads=2",
              "--config.model.embed_dim=32", "--config.model.mlp_dim=64", "--config.train.batch_size=8",
              "--config.train.num_steps=4", "--config.train.warmup_steps=1", "--config.train.log_every=2",
              "--config.train.checkpoint_every=4", "--config.eval.batch_size=8", "--config.eval.elbo_samples=2",
              "--config.eval.max_docs=8", "--config.train.sample_at_end=False")


def write_stream(path, num_lines=600):
  """Lines of words with no blank line between them, and a character that only the held-out tail holds."""
  words = np.random.default_rng(0).choice(["the", "river", "boat", "sails", "north", "at", "dawn", "and"],
                                          size=(num_lines, 6))
  path.write_text("\n".join(" ".join(line) for line in words) + "\nthe end \u03a9\n")
  return str(path)


def tiny_stream_config(family, path, **train_overrides):
  config = char_stream.get_config(family)
  config.data.update(paths=(path,), seq_len=32)
  config.model.update(num_layers=1, num_heads=2, embed_dim=32, mlp_dim=64)
  config.train.update({"batch_size": 8, "num_steps": 6, "warmup_steps": 2, "log_every": 2, "eval_every": 1_000,
                       "checkpoint_every": 3, **train_overrides})
  config.eval.update(batch_size=8, elbo_samples=2, max_docs=8)
  return config


def test_held_out_windows_are_scored_per_character_with_the_error_over_windows(tmp_path):
  path = write_stream(tmp_path / "notes.txt")
  summary = train.train_and_evaluate(tiny_stream_config("mdlm", path), str(tmp_path / "run"))
  assert summary["num_sequences"] == 8 and summary["num_tokens"] == 8 * 32  # every character a token
  assert summary["bits_per_char"] == pytest.approx(summary["bits_per_token"])
  assert summary["bits_per_token_stderr_over_sequences"] > 0
  assert summary["tokens_per_second"] > 0
  model = pipeline.load(str(tmp_path / "run"))
  assert "\u03a9" in model.tokenizer.alphabet and "\n" in model.tokenizer.alphabet  # the whole file's alphabet


def test_killed_run_with_random_windows_resumes_to_the_same_parameters(tmp_path, monkeypatch):
  path = write_stream(tmp_path / "notes.txt")
  config = tiny_stream_config("mdlm", path)
  train.train_and_evaluate(config, str(tmp_path / "whole"))
  real_next = batching.WindowIterator.__next__
  calls = {"n": 0}

  def crashing_next(self):
    calls["n"] += 1
    if calls["n"] == 5:
      raise KeyboardInterrupt("simulated kill")
    return real_next(self)

  monkeypatch.setattr(batching.WindowIterator, "__next__", crashing_next)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / "killed"))
  assert checkpoint.make_manager(str(tmp_path / "killed")).latest_step() == 3
  monkeypatch.setattr(batching.WindowIterator, "__next__", real_next)
  train.train_and_evaluate(config, str(tmp_path / "killed"))
  whole, resumed = (pipeline.load(str(tmp_path / name), use_ema=False).params for name in ("whole", "killed"))
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="needs ../shared/data/tinyshakespeare")
@pytest.mark.parametrize("family", ["mdlm", "ar"])
def test_the_protocol_runs_from_the_launcher_with_config_keys_alone(tmp_path, family):
  workdir = str(tmp_path / family)
  result = subprocess.run([sys.executable, "-m", "ddlm_jax.main", f"--config=experiments/char_stream.py:{family}",
                           f"--workdir={workdir}", f"--config.data.paths={SHAKESPEARE}", *TINY_FLAGS],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "bits/character" in result.stdout and "samples:" not in result.stdout  # sample_at_end=False
  with open(os.path.join(workdir, "train_summary.json")) as file:
    summary = json.load(file)
  assert summary["num_tokens"] == 8 * 32 and "samples" not in summary
  assert summary["bits_per_char"] == pytest.approx(summary["bits_per_token"])
  assert summary["bits_per_token_stderr_over_sequences"] > 0
  assert (summary["estimate"] == "exact NLL") == (family == "ar")
