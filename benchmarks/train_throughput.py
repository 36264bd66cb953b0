"""Train-step throughput of the masked and autoregressive processes, against the matmul peak measured
in the same run, with issue 12's goals.

  python -m benchmarks.train_throughput                        # issue 12's shapes, one device
  python -m benchmarks.train_throughput --compare_fake_devices=8   # also on 8 fake CPU devices

Each step is the one users train with: `config.base_config()` with the shape flags, then
`experiment.make_experiment`, `train.init_state` and `train.make_train_step` (jitted, sharded over
the default mesh, state donated). The processes are timed in turn, round after round (best of
--rounds rounds of --steps steps each), so that the machine's noise hits them alike.

Per row: tokens/s, ms per step, achieved GFLOP/s with FLOPs per token from
`networks.transformer.flops_per_token` over the real vocabulary (6N + attention), that as a share
of the matmul peak (a jitted 2048^2 matmul, best of before and after), and the cores the step kept
busy (process CPU time / wall time over the timed steps). With --compare_fake_devices=N the same
steps also run in a child process with N fake CPU devices (XLA_FLAGS
--xla_force_host_platform_device_count=N, the mesh's data axis over all of them), timed in the
same rounds. Writes benchmarks/results/train_throughput.json (or --output).
"""
import json
import os
import subprocess
import sys

from absl import app
from absl import flags
import jax

from benchmarks import common
from ddlm_jax.networks import transformer

SHAPES = common.define_shape_flags()
_OUTPUT = common.define_output_flag("train_throughput")
_PROCESSES = flags.DEFINE_list("processes", ["masked", "autoregressive"], "Processes whose train steps are "
                               "timed (any of config.PROCESSES).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per process and round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds; each times every process once; the best round counts.")
_PEAK_SIZE = flags.DEFINE_integer("peak_size", 2048, "Side of the square matmul that measures the peak.")
_FAKE_DEVICES = flags.DEFINE_integer("compare_fake_devices", 0, "If > 1: also time the steps on this many fake "
                                     "CPU devices, in a child process, in the same rounds (CPU only).")
_SERVE = flags.DEFINE_bool("serve", False, "Internal (the child of --compare_fake_devices): build the steps, "
                           "then time one round of the process named on each line of stdin.")

# Issue 12's goals, at the default shapes.
GOAL_FRACTION_OF_PEAK = 0.50
GOAL_MASKED_OVER_AR = 1.15
READY = "READY"
ROUND = "ROUND "


def build_step(process: str):
  """(experiment, a function that runs `num_steps` train steps of `process` and blocks), compiled."""
  experiment, step_fn, state, batch_BL, key = common.train_step_setup(SHAPES, process)
  carried = {"state": state}

  def run_steps(num_steps: int) -> None:
    metrics = None
    for _ in range(num_steps):
      previous = metrics
      carried["state"], metrics = step_fn(carried["state"], batch_BL, key)
      jax.block_until_ready(previous)  # at most two steps in flight, as in training
    jax.block_until_ready(metrics)

  run_steps(1)  # compiles
  return experiment, run_steps


def serve() -> None:
  """The child of --compare_fake_devices: answers each process name read from stdin with the
  timing of one round of its steps, as a JSON line after ROUND."""
  runs = {process: build_step(process)[1] for process in _PROCESSES.value}
  print(READY, flush=True)
  for line in sys.stdin:
    timing = common.timed(lambda: runs[line.strip()](_STEPS.value))
    print(ROUND + json.dumps(dict(wall_s=timing.wall_s, cpu_s=timing.cpu_s)), flush=True)


class FakeDevicesChild:
  """This script with --serve in a child process on `num_devices` fake CPU devices."""

  def __init__(self, num_devices: int):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(
        [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={num_devices}"]))
    args = [*sys.argv[1:], "--compare_fake_devices=0", "--serve"]  # the last value of a flag counts
    self.child = subprocess.Popen([sys.executable, "-m", "benchmarks.train_throughput", *args],
                                  env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self._read(READY)

  def _read(self, prefix: str) -> str:
    for line in self.child.stdout:
      if line.startswith(prefix):
        return line[len(prefix):]
    raise RuntimeError(f"the fake-device child exited with code {self.child.wait()} (see its stderr above)")

  def measure(self, process: str) -> common.Timing:
    self.child.stdin.write(process + "\n")
    self.child.stdin.flush()
    return common.Timing(**json.loads(self._read(ROUND)))

  def close(self) -> None:
    self.child.stdin.close()
    self.child.wait()


def main(argv):
  del argv
  if _SERVE.value:
    serve()
    return
  fake_devices = _FAKE_DEVICES.value
  if fake_devices > 1 and jax.default_backend() != "cpu":
    raise ValueError(f"--compare_fake_devices compares CPU device counts; this backend is {jax.default_backend()}")
  child = FakeDevicesChild(fake_devices) if fake_devices > 1 else None  # compiles before the peak is taken
  peak_dtype = SHAPES.dtype.value
  peak = common.matmul_peak_gflops(_PEAK_SIZE.value, peak_dtype)
  here = f"{jax.device_count()} device{'s' if jax.device_count() > 1 else ''}"
  experiments, measures = {}, {}
  for process in _PROCESSES.value:
    experiments[process], run_steps = build_step(process)
    measures[(here, process)] = lambda run_steps=run_steps: common.timed(lambda: run_steps(_STEPS.value))
    if child:
      measures[(f"{fake_devices} fake devices", process)] = lambda process=process: child.measure(process)
  try:
    measured = common.best_of_rounds(measures, _ROUNDS.value)
  finally:
    if child:
      child.close()
  peak = max(peak, common.matmul_peak_gflops(_PEAK_SIZE.value, peak_dtype))

  tokens_per_step = SHAPES.batch_size.value * SHAPES.seq_len.value
  rows = []
  for (devices, process), result in sorted(measured.items(), key=lambda item: item[0][0] != here):
    experiment = experiments[process]
    step_s = result.best_s / _STEPS.value
    flops = transformer.flops_per_token(experiment.model, SHAPES.seq_len.value,
                                        vocab_size=experiment.process.vocab_size)
    gflops = tokens_per_step / step_s * flops / 1e9
    rows.append(dict(devices=devices, process=process, params=transformer.num_params(experiment.model),
                     step_ms=round(step_s * 1e3, 1), tokens_per_s=round(tokens_per_step / step_s),
                     gflops=round(gflops, 1), fraction_of_peak=round(gflops / peak, 3),
                     cores_busy=round(result.cores_busy, 2)))

  step_s = {name: result.best_s / _STEPS.value for name, result in measured.items()}
  goals = [common.goal(f"{row['process']} fraction of peak", row["fraction_of_peak"], GOAL_FRACTION_OF_PEAK, True)
           for row in rows if row["devices"] == here]
  if {"masked", "autoregressive"} <= set(_PROCESSES.value):
    goals.append(common.goal("masked step / autoregressive step",
                             step_s[(here, "masked")] / step_s[(here, "autoregressive")],
                             GOAL_MASKED_OVER_AR, False))
  fake_over_one = {process: round(step_s[(f"{fake_devices} fake devices", process)] / step_s[(here, process)], 3)
                   for process in _PROCESSES.value} if child else {}

  print(f"device: {common.device_description()}; matmul peak ({_PEAK_SIZE.value}^2 {peak_dtype}, best of "
        f"before/after): {peak:.1f} GFLOP/s")
  print(f"shapes: {SHAPES.values()}; best of {_ROUNDS.value} rounds of {_STEPS.value} steps")
  common.print_table(rows, ["devices", "process", "params", "step_ms", "tokens_per_s", "gflops",
                            "fraction_of_peak", "cores_busy"])
  if fake_over_one:
    print(f"step time on {fake_devices} fake devices / on {here}: {fake_over_one}")
  common.print_goals(goals, SHAPES.note())
  path = common.write_json_to(_OUTPUT.value, dict(
      command=common.command_line(), device=common.device_description(), shapes=SHAPES.values(),
      steps=_STEPS.value, rounds=_ROUNDS.value, matmul_peak_gflops=round(peak, 1), rows=rows,
      fake_over_one_device=fake_over_one, goals=goals))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
