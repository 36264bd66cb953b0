"""End to end on a tiny config: training, resuming, sharding, checkpoints, the pipeline API."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import ddlm_jax
from ddlm_jax import checkpoint
from ddlm_jax import config as config_lib
from ddlm_jax import sharding
from ddlm_jax import train
from ddlm_jax.data import batching
from ddlm_jax.data import datasets
from ddlm_jax.data import tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import mdlm_tiny  # pylint: disable=g-import-not-at-top


def tiny_config(**train_overrides):
  config = mdlm_tiny.get_config()
  config.train.update(num_steps=20, checkpoint_every=10, **train_overrides)
  return config


def one_device_mesh():
  return sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("trained"))
  summary = train.train_and_evaluate(tiny_config(), workdir)
  return workdir, summary


def states_of(workdir):
  """The whole train state (params, optimizer, step) of a workdir's latest checkpoint."""
  config = tiny_config()
  manager = checkpoint.make_manager(workdir, read_only=True)
  tokenizer = tokenizers.load_tokenizer(os.path.join(workdir, "tokenizer"))
  experiment = train.make_experiment(config, tokenizer.vocab_size)
  mesh = sharding.make_mesh(sharding.MeshConfig())
  _, abstract_state, _ = train.abstract_state(experiment, config, mesh, train.make_optimizer(config.train))
  return jax.device_get(checkpoint.restore_state(manager, manager.latest_step(), abstract_state))


def assert_trees_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol)


def test_held_out_elbo_is_a_bound_on_the_generator_nll(trained_workdir):
  _, summary = trained_workdir
  assert summary["step"] == 20
  assert summary["bits_per_token_stderr"] > 0
  assert summary["bits_per_token"] + 3 * summary["bits_per_token_stderr"] >= summary["generator_bits_per_token"]


def test_loss_falls_within_a_few_dozen_steps(tmp_path):
  config = tiny_config()
  data = datasets.load_data(config_lib.data_config(config), str(tmp_path))
  experiment = train.make_experiment(config, data.tokenizer.vocab_size)
  mesh = one_device_mesh()
  optimizer = train.make_optimizer(config.train)
  graphdef, state, _ = train.init_state(experiment, config, mesh, optimizer)
  step_fn = jax.jit(lambda s, b, k: train.train_step(s, b, k, graphdef=graphdef, optimizer=optimizer,
                                                     process=experiment.process, ema_decay=0.0))
  nelbo_fn = train.make_nelbo_fn(graphdef, experiment.process)
  eval_rows = jnp.asarray(data.eval_rows[:32])
  held_out = lambda params: float(nelbo_fn(params, eval_rows, jax.random.key(9)).mean())
  before = held_out(state.params)
  batches = batching.BatchIterator(data.train_rows, 16, seed=0)
  for _ in range(40):
    state, metrics = step_fn(state, jnp.asarray(next(batches)), jax.random.key(0))
  after = held_out(state.params)
  assert after < 0.7 * before, (before, after)
  assert np.isfinite(float(metrics["grad_norm"]))


def test_killed_run_resumes_to_the_same_parameters(tmp_path, trained_workdir, monkeypatch):
  uninterrupted_dir, _ = trained_workdir
  workdir = str(tmp_path / "killed")
  real_next = batching.BatchIterator.__next__
  calls = {"n": 0}

  def crashing_next(self):
    calls["n"] += 1
    if calls["n"] == 14:
      raise KeyboardInterrupt("simulated kill")
    return real_next(self)

  monkeypatch.setattr(batching.BatchIterator, "__next__", crashing_next)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(tiny_config(), workdir)
  assert checkpoint.make_manager(workdir).latest_step() == 10
  monkeypatch.setattr(batching.BatchIterator, "__next__", real_next)
  summary = train.train_and_evaluate(tiny_config(), workdir)
  assert summary["step"] == 20
  resumed, uninterrupted = states_of(workdir), states_of(uninterrupted_dir)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
    np.testing.assert_array_equal(a, b)


def test_sigterm_saves_and_stops(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  real_next = batching.BatchIterator.__next__
  calls = {"n": 0}

  def signalling_next(self):
    calls["n"] += 1
    if calls["n"] == 7:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_next(self)

  monkeypatch.setattr(batching.BatchIterator, "__next__", signalling_next)
  summary = train.train_and_evaluate(tiny_config(), workdir)
  assert summary == {"step": 7, "stopped": "SIGTERM"}
  assert checkpoint.make_manager(workdir).latest_step() == 7


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_train_steps_are_the_same_on_every_mesh(tmp_path, mesh_shape):
  config = tiny_config(warmup_steps=1)  # the first step has learning rate 0, the second does not
  data = datasets.load_data(config_lib.data_config(config), str(tmp_path))
  experiment = train.make_experiment(config, data.tokenizer.vocab_size)
  optimizer = train.make_optimizer(config.train)
  batches = [data.train_rows[:16], data.train_rows[16:32]]

  def run(mesh, state=None):
    graphdef, fresh, shardings = train.init_state(experiment, config, mesh, optimizer)
    state = fresh if state is None else jax.device_put(state, shardings)
    step_fn = jax.jit(lambda s, b, k: train.train_step(s, b, k, graphdef=graphdef, optimizer=optimizer,
                                                       process=experiment.process, ema_decay=0.0),
                      in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                      out_shardings=(shardings, sharding.replicated(mesh)))
    initial = jax.device_get(state)
    losses = []
    for batch in batches:
      state, metrics = step_fn(state, jax.device_put(batch, sharding.batch_sharding(mesh)), jax.random.key(3))
      losses.append(float(metrics["loss"]))
    return initial, jax.device_get(state), losses

  initial, reference, reference_losses = run(one_device_mesh())
  _, sharded, sharded_losses = run(sharding.make_mesh(sharding.MeshConfig(*mesh_shape)), initial)
  np.testing.assert_allclose(sharded_losses, reference_losses, rtol=1e-5)
  assert_trees_close(sharded.opt_state, reference.opt_state, atol=1e-5)
  assert_trees_close(sharded.params, reference.params, atol=1e-5)
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(reference.params),
                                                          jax.tree.leaves(initial.params)))
  assert moved > 1e-4  # the comparison is of parameters that really changed


def test_pipeline_generates_scores_and_respects_prompts(trained_workdir):
  workdir, _ = trained_workdir
  model = ddlm_jax.load(workdir)
  texts = model.generate(num_samples=3, steps=8, seed=1)
  assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
  assert model.generate(num_samples=3, steps=8, seed=1) == texts
  prompted = model.generate(["The", "A venue"], steps=8, strategy="random")
  assert prompted[0].startswith("The") and prompted[1].startswith("A venue")
  config = model._sampler_config(dict(steps=8, strategy="random"))
  run = model._sampler(config, prefill_length=0, pad_after_eos=True, guide_fn=None)
  assert run._cache_size() == 1  # two calls with other prompts: one compilation
  one_by_one = model.generate(["The", "A venue", "There is"], steps=8, strategy="random", batch_size=1)
  assert one_by_one[:2] == prompted
  result = model.score(["The Golden Lantern is a pub.", "zzzz qqqq xxxx"], num_samples=2)
  assert result.bits_per_sequence.shape == (2,)
  assert result.bits_per_sequence[1] > result.bits_per_sequence[0]


def test_prompt_longer_than_the_canvas_is_refused(trained_workdir):
  workdir, _ = trained_workdir
  model = ddlm_jax.load(workdir)
  with pytest.raises(ValueError, match="canvas"):
    model.generate(["word " * 200], steps=8)
  with pytest.raises(ValueError, match="length"):
    model.generate(num_samples=1, length=10_000)


def _snapshot(directory):
  return sorted((os.path.relpath(os.path.join(root, name), directory), os.path.getmtime(os.path.join(root, name)))
                for root, _, names in os.walk(directory) for name in names)


def test_checkpoint_of_another_shape_is_refused_and_kept(trained_workdir):
  workdir, _ = trained_workdir
  before = _snapshot(workdir)
  config = tiny_config()
  config.model.num_layers = 3
  with pytest.raises(checkpoint.CheckpointError, match="model.num_layers"):
    train.train_and_evaluate(config, workdir)
  other_data = tiny_config()
  other_data.data.seed = 5
  with pytest.raises(checkpoint.CheckpointError, match="data.seed"):
    train.train_and_evaluate(other_data, workdir)
  assert _snapshot(workdir) == before


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path, trained_workdir):
  workdir, _ = trained_workdir
  broken = str(tmp_path / "broken")
  subprocess.run(["cp", "-r", workdir, broken], check=True)
  latest = checkpoint.make_manager(broken).latest_step()
  state_dir = os.path.join(checkpoint.checkpoint_dir(broken), str(latest), "state")
  for root, _, names in os.walk(state_dir):
    for name in names:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")
  with pytest.raises(checkpoint.CheckpointError, match="cannot be restored"):
    ddlm_jax.load(broken)


def test_unknown_config_key_is_named():
  config = config_lib.base_config()
  config.model.unlock()
  config.model.num_layerz = 3
  with pytest.raises(ValueError, match="num_layerz"):
    config_lib.validate(config)
  values = config_lib.base_config().to_dict()
  values["train"]["batch_size"] = "big"
  bad_type = ml_collections.ConfigDict(values)
  with pytest.raises(ValueError, match="batch_size"):
    config_lib.validate(bad_type)


def test_launcher_rejects_an_unknown_override(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "ddlm_jax.main", "--config=experiments/mdlm_tiny.py",
       f"--workdir={tmp_path}", "--config.model.num_layerz=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "num_layerz" in result.stderr
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("key,value,message", [
    ("sample.strategy", "greedy", "config.sample"),
    ("process.schedule", "quadratic", "config.process"),
    ("eval.elbo_samples", 1, "elbo_samples"),
    ("train.batch_size", 12, "does not split"),
    ("data.source", "web", "config.data"),
])
def test_impossible_values_fail_before_anything_is_written(tmp_path, key, value, message):
  config = tiny_config()
  group, name = key.split(".")
  config[group][name] = value
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


@pytest.mark.parametrize("content", [b"", b"\x00\x01\x02binary\xff\xfe"])
def test_empty_or_binary_corpus_fails_clearly_and_writes_nothing(tmp_path, content):
  path = tmp_path / "corpus.txt"
  path.write_bytes(content)
  config = tiny_config()
  config.data.update(source="text_files", paths=(str(path),))
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match="corpus.txt"):
    train.train_and_evaluate(config, str(workdir))
  assert not os.path.exists(checkpoint.checkpoint_dir(str(workdir)))
  assert not os.path.exists(workdir / "tokenizer")


def test_sigkilled_launcher_resumes_with_the_same_command(tmp_path):
  workdir = str(tmp_path / "run")
  command = [sys.executable, "-m", "ddlm_jax.main", "--config=experiments/mdlm_tiny.py", f"--workdir={workdir}",
             "--config.train.num_steps=60", "--config.train.checkpoint_every=10"]
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while (checkpoint.latest_step(workdir) or 0) < 10 and process.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = checkpoint.latest_step(workdir)
  assert killed_at is not None and killed_at < 60
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"Resumed from step {killed_at}" in result.stdout
  with open(os.path.join(workdir, "train_summary.json")) as f:
    assert json.load(f)["step"] == 60
