"""Two processes on localhost, one CPU device each, talking through gloo over loopback: the same
training as one process on the same global batch (with the parameters split between the processes,
FSDP), each process reading its own half of it, checkpoints that move between one and two processes,
and a SIGTERM to one process that stops both.

The module is also the worker that the tests start (`python tests/multiprocess_test.py ...`): it
joins the processes the way the launcher does (`sharding.init_distributed`, here from the
JAX_* environment), records each step's loss and its first batch, and runs `main.run`, the launcher's
train-evaluate-sample path.
"""
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 150
# The tiniest run of experiments/mdlm_tiny.py:char: 20 steps of a global batch of 8 rows of 32 characters.
TINY = {"data.num_train_docs": 200, "data.num_eval_docs": 16, "data.packing": "pack", "data.seq_len": 32,
        "model.num_layers": 1, "model.embed_dim": 16, "model.mlp_dim": 32, "train.batch_size": 8,
        "train.num_steps": 20, "train.checkpoint_every": 10, "train.log_every": 10, "train.sample_at_end": False,
        "eval.max_docs": 8, "eval.batch_size": 8, "sample.num_samples": 2, "sample.steps": 4}
# Losses and bounds of one process on one device against two on two differ by the order of float sums.
TOLERANCE = dict(rtol=2e-4, atol=2e-4)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def environment(cache_dir: str, process_id: int | None = None, port: int | None = None) -> dict:
  """One CPU device per process (no forced device count), compilations shared through a cache, the
  Python stacks on SIGABRT; with `process_id`, the JAX_* variables of a two-process run (as a pod's
  launcher would set them)."""
  env = {name: value for name, value in os.environ.items() if not name.startswith("JAX_")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_cpu_collective_call_terminate_timeout_seconds=600",
             PYTHONFAULTHANDLER="1", JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  if process_id is not None:
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process_id))
  return env


def start_workers(num_processes: int, workdir: str, out_dir: str, cache_dir: str, **overrides) -> list:
  """Worker processes training the TINY config (with `overrides`) in `workdir`."""
  settings = json.dumps({**TINY, **overrides})
  port = free_port()
  return [subprocess.Popen([sys.executable, os.path.abspath(__file__), workdir, out_dir, settings], cwd=ROOT,
                           env=environment(cache_dir, *((i, port) if num_processes > 1 else ())),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(num_processes)]


def finish(processes: list) -> list[tuple[int, str, str]]:
  """(exit status, stdout, stderr) of each process. Processes still running after TIMEOUT_S are
  aborted, their stacks in their stderr (PYTHONFAULTHANDLER), and then killed."""
  deadline = time.time() + TIMEOUT_S
  outputs = {}
  for process in processes:
    try:
      outputs[process] = process.communicate(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
      break
  for process in processes:
    if process.poll() is None:
      process.send_signal(signal.SIGABRT)
  for process in processes:
    if process not in outputs:
      try:
        outputs[process] = process.communicate(timeout=30)
      except subprocess.TimeoutExpired:
        process.kill()
        outputs[process] = process.communicate()
  return [(process.returncode, *outputs[process]) for process in processes]


def check_ok(results: list) -> None:
  for status, stdout, stderr in results:
    assert status == 0, f"stdout:\n{stdout[-2000:]}\nstderr:\n{stderr[-3000:]}"


def worker_outputs(out_dir: str, num_processes: int) -> list[dict]:
  outputs = []
  for i in range(num_processes):
    with open(os.path.join(out_dir, f"process_{i}.json")) as f:
      outputs.append({**json.load(f), "first_batch": np.load(os.path.join(out_dir, f"batch_{i}.npy"))})
  return outputs


def keep_only_step(workdir: str, step: int) -> None:
  """Deletes every checkpoint after `step`, as if the run had stopped there."""
  directory = os.path.join(workdir, "checkpoints")
  for name in os.listdir(directory):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(os.path.join(directory, name))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Workdirs and worker outputs of the 20-step run on one process and on two, started together. The
  two processes split the parameters and optimizer state between them (mesh.fsdp=2), so each saves and
  restores only its own halves; the launcher's run below keeps them whole on each (data parallel)."""
  root = tmp_path_factory.mktemp("multiprocess")
  cache = str(root / "compilation_cache")
  one, two = str(root / "one"), str(root / "two")
  processes = (start_workers(1, one, one + "_out", cache)
               + start_workers(2, two, two + "_out", cache, **{"train.sample_at_end": True, "mesh.fsdp": 2}))
  results = finish(processes)
  check_ok(results)
  return dict(root=root, cache=cache, one=one, two=two, results=results,
              one_process=worker_outputs(one + "_out", 1)[0], two_processes=worker_outputs(two + "_out", 2))


def test_two_processes_train_as_one_on_the_same_global_batch(runs):
  single, (first, second) = runs["one_process"], runs["two_processes"]
  assert single["process_count"] == 1 and first["process_count"] == second["process_count"] == 2
  assert single["local_devices"] == first["local_devices"] == second["local_devices"] == 1
  assert single["params_held"] == 1 and first["params_held"] < 0.6 and second["params_held"] < 0.6  # fsdp=2
  assert len(first["losses"]) == 20
  assert first["losses"] == second["losses"]  # both see the one replicated loss of each step
  np.testing.assert_allclose(first["losses"], single["losses"], **TOLERANCE)
  assert first["summary"]["bits_per_token"] == second["summary"]["bits_per_token"]
  np.testing.assert_allclose(first["summary"]["bits_per_token"], single["summary"]["bits_per_token"], **TOLERANCE)


def test_each_process_reads_its_own_half_of_the_global_batch(runs):
  whole = runs["one_process"]["first_batch"]
  first, second = (outputs["first_batch"] for outputs in runs["two_processes"])
  assert first.shape == second.shape == (4, 32) and whole.shape == (8, 32)
  np.testing.assert_array_equal(np.concatenate([first, second]), whole)


def test_after_two_process_training_process_0_alone_reports_and_samples(runs):
  (_, stdout_0, _), (_, stdout_1, _) = runs["results"][1:]
  assert "held-out NELBO" in stdout_0 and "samples:" in stdout_0, stdout_0
  assert "held-out NELBO" not in stdout_1 and "samples:" not in stdout_1, stdout_1
  with open(os.path.join(runs["two"], "train_summary.json")) as f:
    summary = json.load(f)
  assert summary["step"] == 20 and len(summary["samples"]) == 2
  assert runs["two_processes"][1]["summary"]["samples"] == summary["samples"]  # the same calls on every process


def start_launchers(workdir: str, cache_dir: str, **overrides) -> list:
  """`python -m ddlm_jax.main` on two processes with its process flags, training TINY with `overrides`."""
  port = free_port()
  flags = [f"--config.{key}={value}" for key, value in {**TINY, **overrides}.items()]
  return [subprocess.Popen(
      [sys.executable, "-m", "ddlm_jax.main", "--config=experiments/mdlm_tiny.py:char", f"--workdir={workdir}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}", *flags],
      cwd=ROOT, env=environment(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]


@pytest.fixture(scope="module")
def later_runs(runs):
  """Started together: step 10 of the one-process run resumed on two processes and of the two-process
  run on one; and the launcher on two processes, process 1 sent SIGTERM once step 10 is saved."""
  from ddlm_jax import checkpoint  # pylint: disable=g-import-not-at-top
  root = runs["root"]
  resumed = {}
  for written_by, resumed_on in (("one", 2), ("two", 1)):
    workdir = str(root / f"{written_by}_resumed_on_{resumed_on}")
    shutil.copytree(runs[written_by], workdir)
    keep_only_step(workdir, 10)
    resumed[resumed_on] = (workdir, start_workers(resumed_on, workdir, workdir + "_out", runs["cache"]))
  stopped = str(root / "stopped")
  # multi_process=True: train_and_evaluate joins the runtime that the launcher's flags joined, a no-op.
  launchers = start_launchers(stopped, runs["cache"], **{"train.num_steps": 100_000, "multi_process": True})
  deadline = time.time() + TIMEOUT_S
  while (checkpoint.latest_step(stopped) or 0) < 10 and time.time() < deadline and launchers[1].poll() is None:
    time.sleep(0.1)
  launchers[1].send_signal(signal.SIGTERM)
  return dict(stopped=(stopped, finish(launchers)),
              resumed={count: (workdir, finish(processes)) for count, (workdir, processes) in resumed.items()})


@pytest.mark.parametrize("resumed_on", [1, 2])
def test_checkpoints_move_between_one_and_two_processes(runs, later_runs, resumed_on):
  """Step 10 of the one-process run resumed on two processes, and of the two-process run on one,
  each finishes as the uninterrupted one-process run did."""
  workdir, results = later_runs["resumed"][resumed_on]
  check_ok(results)
  assert "Resumed from step 10" in results[0][1]
  outputs = worker_outputs(workdir + "_out", resumed_on)
  assert outputs[0]["process_count"] == resumed_on
  np.testing.assert_allclose(outputs[0]["losses"], runs["one_process"]["losses"][10:], **TOLERANCE)
  np.testing.assert_allclose(outputs[0]["summary"]["bits_per_token"],
                             runs["one_process"]["summary"]["bits_per_token"], **TOLERANCE)


def test_sigterm_to_one_process_stops_both_at_one_step_with_one_checkpoint(later_runs):
  """The launcher itself, with its process flags: process 1 gets SIGTERM; both stop at the same
  step, save it together and exit 143; the checkpoint then loads in a single process."""
  from ddlm_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from ddlm_jax import pipeline  # pylint: disable=g-import-not-at-top
  workdir, results = later_runs["stopped"]
  steps = [re.search(r"training stopped at step (\d+) by SIGTERM", stderr) for _, _, stderr in results]
  assert all(steps), [stderr[-2000:] for _, _, stderr in results]
  step = int(steps[0].group(1))
  assert [status for status, _, _ in results] == [143, 143]
  assert int(steps[1].group(1)) == step and step % 10 == 0
  names = os.listdir(checkpoint.checkpoint_dir(workdir))
  assert str(step) in names and not [name for name in names if "tmp" in name], names
  assert checkpoint.latest_step(workdir) == step
  assert pipeline.load(workdir).params is not None


def _worker(workdir: str, out_dir: str, settings: str) -> None:
  """Trains TINY with `settings` through `main.run` in this process (one of JAX_NUM_PROCESSES when the
  JAX_* variables are set) and writes its losses, first batch and summary to `out_dir`."""
  import jax  # pylint: disable=g-import-not-at-top
  from ddlm_jax import main  # pylint: disable=g-import-not-at-top
  from ddlm_jax import sharding  # pylint: disable=g-import-not-at-top
  from ddlm_jax import train  # pylint: disable=g-import-not-at-top
  from ddlm_jax.data import datasets  # pylint: disable=g-import-not-at-top

  sharding.init_distributed(False, sharding.ProcessGroup.from_environment())
  spec = importlib.util.spec_from_file_location("mdlm_tiny", os.path.join(ROOT, "experiments", "mdlm_tiny.py"))
  experiment = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(experiment)
  config = experiment.get_config("char")
  for key, value in json.loads(settings).items():
    group, name = key.split(".")
    config[group][name] = value
  losses, batches, held = [], [], []

  def recording_step(*args, **kwargs):
    step_fn = make_train_step(*args, **kwargs)

    def step(*step_args):
      state, metrics = step_fn(*step_args)
      losses.append(float(metrics["loss"]))
      leaves = jax.tree.leaves(state.params)  # the share of the parameters this process holds
      held.append(sum(leaf.addressable_shards[0].data.size for leaf in leaves) / sum(leaf.size for leaf in leaves))
      return state, metrics
    return step

  class RecordedBatches:
    """The training batches, each one kept as it is read."""

    def __init__(self, iterator):
      self._iterator = iterator

    def __next__(self):
      batches.append(next(self._iterator))
      return batches[-1]

    def __getattr__(self, name):  # get_state, set_state
      return getattr(self._iterator, name)

  recording_batches = lambda *args, **kwargs: RecordedBatches(train_batches(*args, **kwargs))

  make_train_step, train.make_train_step = train.make_train_step, recording_step
  train_batches, datasets.train_batches = datasets.train_batches, recording_batches
  summary = main.run(config, workdir, "train", None)
  os.makedirs(out_dir, exist_ok=True)
  index = jax.process_index()
  np.save(os.path.join(out_dir, f"batch_{index}.npy"), batches[0])
  with open(os.path.join(out_dir, f"process_{index}.json"), "w") as f:
    json.dump({"losses": losses, "summary": summary, "process_count": jax.process_count(),
               "local_devices": jax.local_device_count(), "params_held": max(held)}, f)


if __name__ == "__main__":
  _worker(*sys.argv[1:])
