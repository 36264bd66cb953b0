"""The launcher as a user or a scheduler meets it (`python -m ddlm_jax.main`): its help, the
resolved config, the process flags, and exit statuses that tell a stopped run from a finished one."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

from ddlm_jax import checkpoint
from ddlm_jax import config as config_lib
from ddlm_jax import sharding
from ddlm_jax.data import tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = ["--config.data.num_train_docs=200", "--config.data.num_eval_docs=16", "--config.data.packing=pack",
              "--config.data.seq_len=32", "--config.model.num_layers=1", "--config.model.embed_dim=16",
              "--config.model.mlp_dim=32", "--config.train.batch_size=8", "--config.eval.batch_size=8"]


def launcher(*flags: str) -> list[str]:
  return [sys.executable, "-m", "ddlm_jax.main", "--config=experiments/mdlm_tiny.py:char", *flags]


def one_process_env() -> dict:
  """This machine's environment without the JAX_* variables of a multi-process run."""
  return {name: value for name, value in os.environ.items() if not name.startswith("JAX_")} | {"JAX_PLATFORMS": "cpu"}


def run(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run(launcher(*flags), cwd=ROOT, capture_output=True, text=True, timeout=120, env=one_process_env())


def flat_keys(values: dict, prefix: str = "config.") -> list[str]:
  return [key for name, value in values.items()
          for key in (flat_keys(value, f"{prefix}{name}.") if isinstance(value, dict) else [f"{prefix}{name}"])]


def test_show_config_prints_every_key_with_the_overrides_applied():
  result = run("--mode=show_config", "--config.model.num_layers=3", "--config.data.paths=('a.txt', 'b.txt')")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  shown = {line.split(" = ")[0] for line in lines}
  assert shown == set(flat_keys(config_lib.base_config().to_dict()))
  assert "config.model.num_layers = 3" in lines and "config.data.paths = ('a.txt', 'b.txt')" in lines
  assert "config.data.tokenizer = 'char'" in lines  # the variant's own value


def test_show_config_refuses_an_impossible_value_in_one_line():
  result = run("--mode=show_config", "--config.train.learning_rate=-1.0")
  assert result.returncode == 1 and "config.train.learning_rate" in result.stderr
  assert result.stderr.count("\n") <= 2 and not result.stdout


def test_help_shows_the_launcher_flags_an_intact_usage_and_show_config():
  result = subprocess.run([sys.executable, "-m", "ddlm_jax.main", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
  for flag in ("--config", "--workdir", "--mode", "--prompt", "--coordinator_address", "--num_processes",
               "--process_id"):
    assert f"\n  {flag}:" in result.stdout, flag
  usage = [line for line in result.stdout.splitlines() if line.startswith("  python -m ddlm_jax.main")]
  assert usage and all(line.count("--config=") == 1 for line in usage), usage  # one command per line
  assert "--mode=show_config" in result.stdout and "--config.KEY=VALUE" in result.stdout
  assert "143" in result.stdout and "130" in result.stdout  # the exit statuses


def test_multi_process_without_a_coordinator_names_the_flags_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  result = run(f"--workdir={workdir}", "--config.multi_process=True")
  assert result.returncode == 1, result.stderr
  assert result.stderr.count("\n") <= 2, result.stderr
  for flag in ("--coordinator_address=HOST:PORT", "--num_processes=N", "--process_id=I", "JAX_COORDINATOR_ADDRESS"):
    assert flag in result.stderr, flag
  assert not workdir.exists()


def test_a_second_run_on_a_workdir_in_use_exits_75_and_writes_nothing(tmp_path):
  """A scheduler that started the same run twice sees EX_TEMPFAIL (try again later), not a bad setting."""
  workdir = tmp_path / "run"
  with checkpoint.workdir_lock(str(workdir)):
    before = sorted(os.listdir(workdir))
    result = run(f"--workdir={workdir}", *TINY_FLAGS)
    assert sorted(os.listdir(workdir)) == before
  assert result.returncode == 75, result.stderr
  assert f"is in use by another run (pid {os.getpid()} on " in result.stderr and result.stderr.count("\n") <= 2


def test_compile_check_reports_a_device_s_needs_and_refuses_a_budget_they_exceed(tmp_path):
  """--mode=compile_check compiles without training (no workdir needed) and exits 1 over --memory_gib."""
  result = run("--mode=compile_check", "--memory_gib=0.0001", "--config.data.tokenizer=sentencepiece",
               "--config.sample.num_samples=8", *TINY_FLAGS)
  assert result.returncode == 1, result.stderr
  assert re.search(rf"parameters on {jax.device_count()} devices .*train step: temporaries .* peak .* FLOPs; sampler: .* FLOPs per step",
                   result.stdout), result.stdout
  assert "MemoryBudgetError: the train step needs" in result.stderr and "config.mesh.fsdp" in result.stderr


def test_compile_check_of_a_char_model_reads_the_workdir_s_tokenizer(tmp_path, capsys):
  from ddlm_jax import main  # pylint: disable=g-import-not-at-top
  from experiments import mdlm_tiny  # pylint: disable=g-import-not-at-top
  config = mdlm_tiny.get_config("char")
  config.data.update(seq_len=32)
  config.model.update(num_layers=1, embed_dim=16, mlp_dim=32)
  config.sample.update(num_samples=8)
  with pytest.raises(ValueError, match=r"'char' tokenizer's vocabulary is known only once it is built .* --workdir"):
    main.check_compiled_size(config, str(tmp_path), memory_gib=None)
  tokenizers.CharTokenizer.train(["abc"]).save(str(tmp_path / "tokenizer"))
  main.check_compiled_size(config, str(tmp_path), memory_gib=1000.0)
  printed = capsys.readouterr().out
  assert f"parameters on {jax.device_count()} devices" in printed and "fits 1000.00 GiB per device" in printed


def test_a_bad_config_fails_before_waiting_for_the_other_processes(tmp_path):
  """Process 1 of two whose coordinator never comes: the config's mistake is reported at once."""
  result = run(f"--workdir={tmp_path / 'run'}", "--config.train.learning_rate=-1.0",
               f"--coordinator_address=127.0.0.1:{_closed_port()}", "--num_processes=2", "--process_id=1")
  assert result.returncode == 1 and "config.train.learning_rate" in result.stderr, result.stderr


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_process_group_takes_flags_over_the_environment():
  environ = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert sharding.ProcessGroup.from_environment(environ, process_id=1) == sharding.ProcessGroup("10.0.0.1:1234", 4, 1)
  assert not sharding.ProcessGroup.from_environment({}).is_set
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='four' is not an integer"):
    sharding.ProcessGroup.from_environment({"JAX_NUM_PROCESSES": "four"})


def test_a_single_process_run_never_joins_a_runtime():
  sharding.init_distributed(False, sharding.ProcessGroup())  # neither connects nor raises
  assert not jax.distributed.is_initialized()


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
  """(workdir, exit status, stderr) of a run that Ctrl-C stopped once its step-10 checkpoint was saved."""
  workdir = str(tmp_path_factory.mktemp("interrupted") / "run")
  process = subprocess.Popen(launcher(f"--workdir={workdir}", *TINY_FLAGS, "--config.train.num_steps=100000",
                                      "--config.train.checkpoint_every=10"),
                             cwd=ROOT, env=one_process_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while (checkpoint.latest_step(workdir) or 0) < 10 and time.time() < deadline and process.poll() is None:
    time.sleep(0.1)
  process.send_signal(signal.SIGINT)
  try:
    _, stderr = process.communicate(timeout=120)
  finally:
    process.kill()
  return workdir, process.returncode, stderr


def test_ctrl_c_exits_130_so_a_scheduler_sees_an_interrupted_run(interrupted):
  _, status, stderr = interrupted
  assert status == 130, stderr[-3000:]
  assert "by SIGINT" in stderr and "the same command resumes" in stderr, stderr[-3000:]


def test_evaluation_over_several_batches_reports_progress_in_whole_lines(interrupted):
  workdir, _, _ = interrupted
  result = run(f"--workdir={workdir}", *TINY_FLAGS, "--mode=eval", "--config.eval.max_docs=16")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [line for line in result.stdout.splitlines() if line.startswith("evaluate: ")]
  assert lines and lines[-1].startswith("evaluate: 4/4 "), result.stdout  # 2 batches of 8 rows, 2 draws each
  assert "\r" not in result.stdout + result.stderr


def test_sampling_shows_progress_only_over_several_batches(interrupted, capsys):
  from ddlm_jax import pipeline  # pylint: disable=g-import-not-at-top
  model = pipeline.load(interrupted[0])
  model.generate(num_samples=3, batch_size=2, steps=2)
  assert capsys.readouterr().out.splitlines()[-1].startswith("generate: 2/2 ")
  model.generate(num_samples=2, steps=2)
  assert not capsys.readouterr().out
