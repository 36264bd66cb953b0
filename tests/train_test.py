"""End to end on a tiny config: training, resuming, sharding, checkpoints, the pipeline API."""
import dataclasses
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
from ddlm_jax import evaluate
from ddlm_jax import experiment as experiment_lib
from ddlm_jax import schedules
from ddlm_jax import sharding
from ddlm_jax import train
from ddlm_jax.data import batching
from ddlm_jax.data import datasets
from ddlm_jax.data import tokenizers
from ddlm_jax.processes import d3pm
from ddlm_jax.processes import gaussian

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import mdlm_tiny  # pylint: disable=g-import-not-at-top


def tiny_config(**train_overrides):
  config = mdlm_tiny.get_config()
  config.train.update({"num_steps": 20, "checkpoint_every": 10, **train_overrides})
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
  experiment = experiment_lib.make_experiment(config, tokenizer.vocab_size)
  mesh = sharding.make_mesh(sharding.MeshConfig())
  _, abstract_state, _ = train.abstract_state(experiment, config, mesh, experiment_lib.make_optimizer(config.train))
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
  experiment = experiment_lib.make_experiment(config, data.tokenizer.vocab_size)
  mesh = one_device_mesh()
  optimizer = experiment_lib.make_optimizer(config.train)
  graphdef, state, shardings = train.init_state(experiment, config, mesh, optimizer)
  step_fn = train.make_train_step(experiment, graphdef, optimizer, mesh, shardings)
  nelbo_fn = experiment_lib.make_nelbo_fn(graphdef, experiment.process)
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
  experiment = experiment_lib.make_experiment(config, data.tokenizer.vocab_size)
  optimizer = experiment_lib.make_optimizer(config.train)
  batches = [data.train_rows[:16], data.train_rows[16:32]]

  def run(mesh, state=None):
    graphdef, fresh, shardings = train.init_state(experiment, config, mesh, optimizer)
    state = fresh if state is None else jax.device_put(state, shardings)
    step_fn = train.make_train_step(experiment, graphdef, optimizer, mesh, shardings)
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
  unpadded = tiny_config()
  unpadded.model.vocab_multiple = 1
  with pytest.raises(checkpoint.CheckpointError, match="model.vocab_multiple: checkpoint 128 vs now 1"):
    train.train_and_evaluate(unpadded, workdir)
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
  with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint step {latest} in .* cannot be read"):
    ddlm_jax.load(broken, step=latest)


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
  assert result.returncode == 1
  assert result.stderr.count("\n") <= 2 and "num_layerz" in result.stderr, result.stderr
  assert 'Did you mean "num_layers"' in result.stderr
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("key,value,message", [
    ("sample.strategy", "greedy", "config.sample"),
    ("process.schedule", "quadratic", "config.process"),
    ("eval.elbo_samples", 1, "elbo_samples"),
    ("train.batch_size", 12, "does not split"),
    ("data.source", "web", "config.data"),
    ("data.vocab_size", 5, "vocab_size must be at least 262"),
    ("data.seed", -1, "seed"),
    ("seed", -1, r"config.seed must be a finite number in \[0, inf\)"),
    ("train.grad_clip_norm", -1.0, r"config.train.grad_clip_norm must be a finite number in \(0, inf\)"),
    ("train.grad_clip_norm", 0.0, "config.train.grad_clip_norm"),
    ("train.learning_rate", -1.0, "config.train.learning_rate"),
    ("train.learning_rate", float("nan"), "config.train.learning_rate"),
    ("train.learning_rate", float("inf"), "config.train.learning_rate"),
    ("train.warmup_steps", -3, "config.train.warmup_steps"),
    ("train.time_limit_minutes", -1.0, "config.train.time_limit_minutes"),
    ("train.min_learning_rate_ratio", 1.5, r"config.train.min_learning_rate_ratio must be a finite number in \[0, 1\]"),
    ("train.weight_decay", -0.1, "config.train.weight_decay"),
    ("train.b1", 1.0, r"config.train.b1 must be a finite number in \[0, 1\)"),
    ("train.b2", -0.5, "config.train.b2"),
    ("train.ema_decay", float("nan"), "config.train.ema_decay"),
    ("train.log_every", 0, "config.train.log_every"),
    ("eval.max_docs", 0, "config.eval.max_docs"),
])
def test_impossible_values_fail_before_anything_is_written(tmp_path, key, value, message):
  config = tiny_config()
  *groups, name = key.split(".")
  (config[groups[0]] if groups else config)[name] = value
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


# Every process and schedule the config accepts, through the jitted train step and bound.
PROCESS_SETTINGS = (
    [dict(name=name, schedule=kind) for name in ("masked", "uniform") for kind in schedules.SCHEDULES]
    + [dict(name="d3pm", transition=transition, schedule=kind, num_steps=10)
       for transition in d3pm.TRANSITIONS for kind in schedules.SCHEDULES]
    + [dict(name="gaussian", schedule=kind, num_steps=10) for kind in gaussian.NOISE_KINDS]
    + [dict(name="autoregressive")])
TINY_VOCAB_SIZE = len(tokenizers.SPECIAL_TOKENS) + 8
# (network settings, EMA decay, mesh) -> (graphdef, state on the host, shardings): processes that share
# a network share it.
_FRESH_STATES = {}


def tiny_model_run(process: dict, ema_decay: float = 0.0, mesh_config: sharding.MeshConfig | None = None,
                   num_heads: int = 1):
  """(experiment, graphdef, fresh state, train step as training runs it (`train.make_train_step`),
  rows_BL) of a one-layer network over seq_len 16 trained by `process` (settings of
  config.process), on one device or on the mesh of `mesh_config`. The step donates the state it
  is given."""
  config = config_lib.base_config()
  config.process.update(**process)
  config.data.seq_len = 16
  config.model.update(num_layers=1, num_heads=num_heads, embed_dim=16, mlp_dim=16,
                      time_conditioning=process["name"] == "gaussian")
  config.train.update(ema_decay=ema_decay, warmup_steps=0)
  config_lib.validate(config)
  rows_BL = jax.random.randint(jax.random.key(0), (4, 16), len(tokenizers.SPECIAL_TOKENS), TINY_VOCAB_SIZE)
  graph_settings = experiment_lib.neighbor_graph_settings(config.process)
  graph = graph_settings.build(np.asarray(rows_BL), TINY_VOCAB_SIZE) if graph_settings else None
  experiment = experiment_lib.make_experiment(config, TINY_VOCAB_SIZE, graph)
  optimizer = experiment_lib.make_optimizer(config.train)
  mesh = one_device_mesh() if mesh_config is None else sharding.make_mesh(mesh_config)
  name = (experiment.model, ema_decay, mesh_config)
  if name not in _FRESH_STATES:
    graphdef, state, shardings = train.init_state(experiment, config, mesh, optimizer)
    _FRESH_STATES[name] = graphdef, jax.device_get(state), shardings
  graphdef, state, shardings = _FRESH_STATES[name]
  step_fn = train.make_train_step(experiment, graphdef, optimizer, mesh, shardings, ema_decay=ema_decay)
  return experiment, graphdef, jax.device_put(state, shardings), step_fn, rows_BL


@pytest.mark.parametrize("process", PROCESS_SETTINGS, ids=lambda p: "-".join(map(str, p.values())))
def test_every_process_and_schedule_trains_and_bounds_under_jit(process):
  experiment, graphdef, state, step_fn, rows_BL = tiny_model_run(process)
  initial_params = jax.device_get(state.params)
  for _ in range(2):
    state, metrics = step_fn(state, rows_BL, jax.random.key(1))
    assert np.isfinite(float(metrics["loss"])), metrics
  assert int(state.step) == 2 and float(metrics["grad_norm"]) > 0
  moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(initial_params))]
  assert max(moved) > 0  # the optimizer's updates reached the parameters
  nats_B = experiment_lib.make_nelbo_fn(graphdef, experiment.process)(state.params, rows_BL, jax.random.key(2))
  assert nats_B.shape == (4,) and np.isfinite(np.asarray(nats_B)).all(), nats_B


def test_the_train_step_donates_the_state_and_splits_the_batch_over_the_mesh():
  mesh_config = sharding.MeshConfig(data=2, fsdp=2, tensor=2)
  _, _, state, step_fn, rows_BL = tiny_model_run(dict(name="masked"), ema_decay=0.5, mesh_config=mesh_config,
                                                 num_heads=2)
  mesh = sharding.make_mesh(mesh_config)
  shardings = jax.tree.map(lambda array: array.sharding, state)
  assert any(not sharding_.is_fully_replicated for sharding_ in jax.tree.leaves(shardings))
  compiled = step_fn.lower(state, rows_BL, jax.random.key(1)).compile()
  assert compiled.input_shardings[0][1].is_equivalent_to(sharding.batch_sharding(mesh), rows_BL.ndim)
  new_state, metrics = step_fn(state, rows_BL, jax.random.key(1))
  assert all(array.is_deleted() for array in jax.tree.leaves(state))  # donated, not copied
  for array, expected in zip(jax.tree.leaves(new_state), jax.tree.leaves(shardings), strict=True):
    assert array.sharding.is_equivalent_to(expected, array.ndim), (array.sharding, expected)
  assert all(value.sharding.is_fully_replicated for value in metrics.values())


def test_ema_decay_warms_up():
  decays = train.warmed_up_ema_decay(jnp.array([0, 80, 890, 10**6]), 0.9999)
  np.testing.assert_allclose(decays, [0.1, 0.9, 0.99, 0.9999], rtol=1e-6)
  assert float(train.warmed_up_ema_decay(jnp.array(10**6), 0.5)) == 0.5


def test_first_ema_update_follows_the_new_parameters():
  _, _, initial, step_fn, rows_BL = tiny_model_run(dict(name="masked"), ema_decay=0.9999)
  initial = jax.device_get(initial)
  state, _ = step_fn(initial, rows_BL, jax.random.key(1))
  expected = jax.tree.map(lambda e, p: 0.1 * e + 0.9 * p, initial.ema_params, jax.device_get(state.params))
  assert_trees_close(state.ema_params, expected, atol=1e-6)


def test_ema_run_evaluates_and_loads_the_ema(tmp_path, capsys, monkeypatch):
  evaluated = []  # the parameters of every held-out evaluation of the run
  real_held_out_elbo = evaluate.held_out_elbo

  def recording_held_out_elbo(nelbo_fn, params, *args, **kwargs):
    evaluated.append(jax.device_get(params))
    return real_held_out_elbo(nelbo_fn, params, *args, **kwargs)

  monkeypatch.setattr(evaluate, "held_out_elbo", recording_held_out_elbo)
  workdir = str(tmp_path)
  summary = train.train_and_evaluate(tiny_config(ema_decay=0.99, num_steps=10, eval_every=5), workdir)
  assert summary["params"] == "EMA"
  printed = capsys.readouterr()
  assert "(EMA parameters)" in printed.out.split("step 5: held-out")[1].splitlines()[0]
  assert "EMA parameters, held-out NELBO" in printed.out
  ema, raw = ddlm_jax.load(workdir).params, ddlm_jax.load(workdir, use_ema=False).params
  gaps = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(raw))]
  assert max(gaps) > 1e-6  # two different sets of parameters, and the EMA is the default
  assert len(evaluated) == 2  # at step 5 and at the end
  assert_trees_close(evaluated[-1], ema, atol=0)  # the final evaluation scored the EMA that load returns


def test_the_training_loop_stops_where_the_processes_agree(tmp_path, monkeypatch):
  asked = []

  def agreement(local_reason, step, process_count, gather):  # another process got SIGTERM at step 10
    asked.append(step)
    return "SIGTERM" if step == train.STOP_AGREEMENT_EVERY else local_reason

  monkeypatch.setattr(train, "agreed_stop_reason", agreement)
  summary = train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert summary == {"step": train.STOP_AGREEMENT_EVERY, "stopped": "SIGTERM"}
  assert asked == list(range(1, train.STOP_AGREEMENT_EVERY + 1))  # asked after every step, acted on the answer


class _RowsSeen:
  """A process whose loss reports the rows and prompt mask the train step hands it."""

  def loss(self, model_fn, rows_BL, key, prompt_mask_BL):
    del key
    logits_BLW = model_fn(rows_BL, jnp.zeros(rows_BL.shape[:1]))
    loss = jnp.mean(logits_BLW ** 2)
    return loss, {"loss": loss, "rows": rows_BL, "prompt_mask": prompt_mask_BL}


def test_jitted_train_step_drops_the_condition_of_a_pair_row():
  experiment, graphdef, state, _, _ = tiny_model_run(dict(name="masked"))
  pair_experiment = dataclasses.replace(experiment, process=_RowsSeen(),
                                        data=dataclasses.replace(experiment.data, task="data_to_text"))
  eos, pad = tokenizers.EOS_ID, tokenizers.PAD_ID
  rows_BL = jnp.array([[7, 8, eos, 9, 10, eos] + [pad] * 10] * 4, jnp.int32)
  step = train.make_train_step(pair_experiment, graphdef, experiment_lib.make_optimizer(config_lib.base_config().train),
                               one_device_mesh(), jax.tree.map(lambda array: array.sharding, state),
                               condition_dropout=1.0)
  _, metrics = step(state, rows_BL, jax.random.key(0))
  seen_BL = np.asarray(metrics["rows"])
  assert (seen_BL[:, :2] == pad).all() and (seen_BL[:, 2:] == np.asarray(rows_BL)[:, 2:]).all()
  assert (np.asarray(metrics["prompt_mask"]) == (np.arange(16) < 3)).all()  # the source and its [EOS]


def test_diverging_run_raises_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  real_step = train.train_step

  def diverging_step(state, batch_BL, key, **settings):  # parameters turn NaN after step 12
    state, metrics = real_step(state, batch_BL, key, **settings)
    poison = jnp.where(state.step > 12, jnp.nan, 1.0)
    return state.replace(params=jax.tree.map(lambda p: p * poison, state.params)), metrics

  monkeypatch.setattr(train, "train_step", diverging_step)
  workdir = str(tmp_path)
  with pytest.raises(FloatingPointError, match="diverged at step 20.*step 10"):
    train.train_and_evaluate(tiny_config(), workdir)
  manager = checkpoint.make_manager(workdir, read_only=True)
  assert manager.all_steps() == [10]
  assert checkpoint.all_finite(states_of(workdir))


def test_checkpoint_save_refuses_a_non_finite_state(tmp_path):
  manager = checkpoint.make_manager(str(tmp_path))
  checkpoint.save(manager, 1, {"w": jnp.ones(3)}, {}, {}, {}, {})
  with pytest.raises(FloatingPointError, match=r"step 2 holds NaN or Inf.*step 1"):
    checkpoint.save(manager, 2, {"w": jnp.array([1.0, jnp.inf, 0.0])}, {}, {}, {}, {})
  with pytest.raises(FloatingPointError, match="step 3 holds NaN"):  # in any part of the state, e.g. the EMA
    checkpoint.save(manager, 3, {"w": jnp.ones(3), "ema": {"w": jnp.array([jnp.nan])}, "step": jnp.array(3)},
                    {}, {}, {}, {})
  assert manager.all_steps() == [1]


def test_processes_stop_together_for_the_most_urgent_reason():
  def no_gather(codes):
    raise AssertionError("a single process must not sync")

  assert train.agreed_stop_reason("SIGTERM", 3, 1, no_gather) == "SIGTERM"
  assert train.agreed_stop_reason(None, 3, 1, no_gather) is None
  assert train.agreed_stop_reason("time limit", 3, 4, no_gather) is None  # not an agreement step
  every = train.STOP_AGREEMENT_EVERY
  others = lambda *codes: lambda local: np.array([local, *codes], np.int32)
  assert train.agreed_stop_reason(None, every, 3, others(0, 2)) == "SIGTERM"
  assert train.agreed_stop_reason("time limit", 2 * every, 3, others(0, 2)) == "SIGTERM"
  assert train.agreed_stop_reason(None, every, 3, others(1, 0)) == "time limit"
  assert train.agreed_stop_reason(None, every, 3, others(0, 0)) is None


def test_stop_request_reports_sigterm_before_the_time_limit():
  unlimited = train._StopRequest(time_limit_minutes=0.0)
  assert unlimited.local_reason() is None
  unlimited(signal.SIGTERM, None)
  assert unlimited.local_reason() == "SIGTERM"
  limited = train._StopRequest(time_limit_minutes=0.01)  # 0.6 s
  assert limited.local_reason() is None
  time.sleep(0.7)
  assert limited.local_reason() == "time limit"
  limited(signal.SIGTERM, None)
  assert limited.local_reason() == "SIGTERM"


def launch(*flags, env=None):
  """The launcher on the tiny config, as a user runs it."""
  return subprocess.run([sys.executable, "-m", "ddlm_jax.main", "--config=experiments/mdlm_tiny.py", *flags],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def test_launcher_reports_a_bad_value_in_one_line(tmp_path):
  result = launch(f"--workdir={tmp_path}", "--config.train.learning_rate=-1.0")
  assert result.returncode == 1
  assert result.stderr.count("\n") <= 2 and "config.train.learning_rate" in result.stderr, result.stderr
  shown = launch(f"--workdir={tmp_path}", "--config.train.learning_rate=-1.0", env={"DDLM_TRACEBACK": "1"})
  assert shown.returncode != 0 and "Traceback" in shown.stderr


def test_launcher_samples_each_prompt_num_samples_times_without_orbax_warnings(trained_workdir):
  workdir, _ = trained_workdir
  result = launch(f"--workdir={workdir}", "--mode=sample", "--prompt=The", "--prompt=A venue",
                  "--config.sample.num_samples=2", "--config.sample.steps=4")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "read only" not in result.stderr and "checkpoint_manager" not in result.stderr, result.stderr
  with open(os.path.join(workdir, "sample_summary.json")) as f:
    samples = json.load(f)["samples"]
  assert len(samples) == 4 and [text[:3] for text in samples] == ["The", "The", "A v", "A v"], samples


def test_launcher_names_each_unreadable_checkpoint_then_fails_in_one_line(tmp_path, trained_workdir):
  workdir, _ = trained_workdir
  broken = str(tmp_path / "broken")
  subprocess.run(["cp", "-r", workdir, broken], check=True)
  steps = checkpoint.make_manager(broken).all_steps()
  for step in steps:  # a damaged latest step alone is passed over, with a warning: damage them all
    for root, _, names in os.walk(os.path.join(checkpoint.checkpoint_dir(broken), str(step), "state")):
      for name in names:
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"\x00garbage")
  result = launch(f"--workdir={broken}", "--mode=sample")
  assert result.returncode == 1
  *warnings, error, hint = result.stderr.strip().splitlines()
  assert len(warnings) == len(steps) and all("cannot be read" in line for line in warnings), result.stderr
  assert "no checkpoint in" in error and "can be read" in error and "DDLM_TRACEBACK" in hint, result.stderr


def write_paragraphs(path, word):
  path.write_text("\n\n".join(f"The {word} number {i} sits by the river." for i in range(80)))


def text_file_config(path):
  config = tiny_config(num_steps=2, checkpoint_every=2)
  config.data.update(source="text_files", paths=(str(path),), tokenizer="char", seq_len=48,
                     validation_fraction=0.1)
  config.eval.update(max_docs=8)
  return config


def test_edited_text_file_is_refused_on_resume_and_the_workdir_kept(tmp_path):
  path, workdir = tmp_path / "notes.txt", str(tmp_path / "run")
  write_paragraphs(path, "boat")
  train.train_and_evaluate(text_file_config(path), workdir)
  write_paragraphs(path, "goat")  # same length, other content
  before = _snapshot(workdir)
  with pytest.raises(checkpoint.CheckpointError, match="data_fingerprint"):
    train.train_and_evaluate(text_file_config(path), workdir)
  assert _snapshot(workdir) == before


def test_tokenizer_trained_on_other_texts_is_refused_and_the_workdir_kept(tmp_path):
  path, workdir = tmp_path / "notes.txt", str(tmp_path / "run")
  write_paragraphs(path, "boat")
  data_config = config_lib.data_config(text_file_config(path))
  datasets.load_data(data_config, workdir)  # a run that stopped before its first checkpoint
  write_paragraphs(path, "goat")
  before = _snapshot(workdir)
  with pytest.raises(ValueError, match="trained on other texts"):
    datasets.load_data(data_config, workdir)
  assert _snapshot(workdir) == before
  write_paragraphs(path, "boat")
  assert datasets.load_data(data_config, workdir).tokenizer.vocab_size > 0  # the same texts are welcome


def test_checkpoint_without_a_data_fingerprint_still_resumes():
  current = config_lib.run_identity(tiny_config())
  older = {key: value for key, value in json.loads(json.dumps(current)).items() if key != "data_fingerprint"}
  checkpoint.check_identity(config_lib.saved_run_identity(older, current), current, "workdir")
  edited = {**older, "data_fingerprint": "0" * 16}
  with pytest.raises(checkpoint.CheckpointError, match="data_fingerprint: checkpoint '0000"):
    checkpoint.check_identity(config_lib.saved_run_identity(edited, current), current, "workdir")


def test_resuming_with_more_steps_says_so(tmp_path, trained_workdir, capsys):
  workdir, _ = trained_workdir
  extended = str(tmp_path / "extended")
  subprocess.run(["cp", "-r", workdir, extended], check=True)
  summary = train.train_and_evaluate(tiny_config(num_steps=22), extended)
  assert summary["step"] == 22
  assert "config.train.num_steps is 22, the checkpoint's run had 20: from step 20 on" in capsys.readouterr().out


@pytest.mark.parametrize("schedule,middle", [("cosine", 0.55), ("linear", 0.55), ("constant", 1.0)])
def test_learning_rate_schedules_after_warm_up(schedule, middle):
  config = tiny_config(schedule=schedule, learning_rate=1.0, warmup_steps=100, num_steps=1_000,
                       min_learning_rate_ratio=0.1)
  learning_rate = experiment_lib.learning_rate_schedule(config.train)
  assert float(learning_rate(0)) == 0.0 and float(learning_rate(50)) == pytest.approx(0.5)
  assert float(learning_rate(100)) == pytest.approx(1.0)
  assert float(learning_rate(550)) == pytest.approx(middle, abs=1e-3)
  assert float(learning_rate(1_000)) == pytest.approx(1.0 if schedule == "constant" else 0.1)
  if schedule == "linear":  # halfway through the decay of a line, not of a cosine
    assert float(learning_rate(325)) == pytest.approx(1.0 - 0.9 * 0.25, abs=1e-3)


def test_adam_eps_reaches_the_optimizer():
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.full(3, 1e-3)}

  def first_update(eps):
    optimizer = experiment_lib.make_optimizer(tiny_config(eps=eps, warmup_steps=0, weight_decay=0.0).train)
    return float(optimizer.update(grads, optimizer.init(params), params)[0]["w"][0])

  assert first_update(1e-8) == pytest.approx(-3e-3, rel=1e-3)  # Adam's first step: -lr * sign(g)
  assert first_update(1e-3) == pytest.approx(-1.5e-3, rel=1e-3)  # -lr * g / (|g| + eps)


def test_training_clock_counts_steps_and_seconds_between_pauses(monkeypatch):
  now = {"t": 0.0}
  monkeypatch.setattr(train.time, "perf_counter", lambda: now["t"])
  clock = train.TrainingClock()
  clock.start(0)
  now["t"] = 1.0
  assert clock.lap(10) == 10.0
  now["t"] = 2.0
  clock.stop(20)            # an evaluation from t=2 to t=7 is not training
  now["t"] = 7.0
  clock.start(20)
  clock.start(21)           # a running clock ignores start
  now["t"] = 9.0
  assert clock.lap(40) == pytest.approx(30 / 3)  # the lap spans the pause
  assert clock.total_rate() == pytest.approx(40 / 4)
  assert clock.total_steps == 40 and clock.total_seconds == pytest.approx(4.0)


@pytest.mark.parametrize("sample_at_end", [True, False])
def test_the_launcher_samples_after_training_only_when_asked(tmp_path, trained_workdir, sample_at_end, capsys):
  from ddlm_jax import main  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "finished")
  subprocess.run(["cp", "-r", trained_workdir[0], workdir], check=True)
  config = tiny_config(sample_at_end=sample_at_end)
  config.sample.update(num_samples=2, steps=4)
  main.run(config, workdir, "train", None)  # a finished run: evaluates again, then samples or not
  with open(os.path.join(workdir, "train_summary.json")) as f:
    summary = json.load(f)
  assert ("samples" in summary) == sample_at_end and ("samples:" in capsys.readouterr().out) == sample_at_end
  assert summary["step"] == 20 and "bits_per_token" in summary
