"""What each family's `base` (GPT-2-small-sized) config needs per device on an 8-device mesh, from
the compiled train step and sampler alone (no training): `ddlm_jax.compile_check`.

  python -m benchmarks.compile_check                    # every family, 8 fake CPU devices
  python -m benchmarks.compile_check --families=mdlm,ar --num_devices=16 --fsdp=8 --output=/tmp/check.json

On a CPU the benchmark runs itself again with XLA_FLAGS=--xla_force_host_platform_device_count=N
unless it already sees N devices. Per family: parameters, this device's bytes of parameters,
optimizer state and EMA, the train step's temporaries and peak, its FLOPs against the closed form
(6 per parameter per token and attention), the sampler's temporaries, peak and FLOPs per step, and
the seconds the two compilations took. A config over the budget (--memory_gib, default
experiments/compare.py's BASE_MEMORY_GIB) is marked OVER and the benchmark exits with status 1
after writing benchmarks/results/compile_check.json (or --output).
"""
import os
import sys
import time

from absl import app
from absl import flags
import jax

from benchmarks import common
from ddlm_jax import compile_check
from experiments import compare
from experiments import diffusion_lm

# Family -> (experiment module, variant, settings changed from it).
BASE_CONFIGS = {
    **{family: (compare, f"{family},embedded,base", {}) for family in compare.FAMILIES},
    "gaussian": (diffusion_lm, "base", {}),
}

_FAMILIES = flags.DEFINE_list("families", list(BASE_CONFIGS), "Families whose base configs are compiled.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 8, "Devices of the mesh (fake CPU devices on a CPU).")
_FSDP = flags.DEFINE_integer("fsdp", 1, "config.mesh.fsdp: devices the parameters are split over (the data axis takes "
                             "the rest).")
_MEMORY_GIB = flags.DEFINE_float("memory_gib", compare.BASE_MEMORY_GIB, "Memory budget per device, GiB.")
_OUTPUT = common.define_output_flag("compile_check")

COLUMNS = ["family", "params_M", "param_GiB", "optimizer_GiB", "ema_GiB", "train_temp_GiB", "train_peak_GiB",
           "train_TFLOPs", "train_flops_over_model", "sampler_temp_GiB", "sampler_peak_GiB", "sampler_step_GFLOPs",
           "sampler_steps", "compile_s", "budget"]


def base_config(family: str, fsdp: int):
  module, variant, changes = BASE_CONFIGS[family]
  config = module.get_config(variant)
  config.update_from_flattened_dict(changes)
  config.mesh.fsdp = fsdp
  return config


def row(family: str, report: compile_check.CompileReport, seconds: float, budget: str) -> dict:
  gib = lambda n: round(n / compile_check.GIB, 3)
  return dict(family=family, params_M=round(report.num_params / 1e6, 1), param_GiB=gib(report.param_bytes),
              optimizer_GiB=gib(report.optimizer_bytes), ema_GiB=gib(report.ema_bytes),
              train_temp_GiB=gib(report.train_step.temp_bytes), train_peak_GiB=gib(report.train_step.peak_bytes),
              train_TFLOPs=round(report.train_step.flops / 1e12, 3),
              train_flops_over_model=round(report.train_step.flops / report.train_model_flops, 3),
              sampler_temp_GiB=gib(report.sampler.temp_bytes), sampler_peak_GiB=gib(report.sampler.peak_bytes),
              sampler_step_GFLOPs=round(report.sampler.flops / 1e9, 2), sampler_steps=report.sampler_steps,
              compile_s=round(seconds, 1), budget=budget)


def rerun_with_fake_devices(num_devices: int) -> None:
  """Replaces this process by the same command on `num_devices` fake CPU devices."""
  flags_value = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={num_devices}"
  env = dict(os.environ, XLA_FLAGS=flags_value.strip(), JAX_PLATFORMS="cpu")
  os.execve(sys.executable, [sys.executable, "-m", "benchmarks.compile_check", *sys.argv[1:]], env)


def main(argv):
  del argv
  num_devices, memory_gib = _NUM_DEVICES.value, _MEMORY_GIB.value
  unknown = sorted(set(_FAMILIES.value) - set(BASE_CONFIGS))
  if unknown:
    raise ValueError(f"unknown families {unknown}; known: {sorted(BASE_CONFIGS)}")
  if jax.device_count() != num_devices:
    if jax.default_backend() != "cpu":
      raise ValueError(f"--num_devices={num_devices}, but this {jax.default_backend()} has {jax.device_count()}")
    rerun_with_fake_devices(num_devices)
  rows, failures = [], []
  for family in _FAMILIES.value:
    started = time.perf_counter()
    report = compile_check.compile_report(base_config(family, _FSDP.value))
    seconds = time.perf_counter() - started
    print(f"{family}: {report.describe()}", flush=True)
    try:
      compile_check.check_budget(report, memory_gib)
      rows.append(row(family, report, seconds, "fits"))
    except compile_check.MemoryBudgetError as error:
      rows.append(row(family, report, seconds, "OVER"))
      failures.append(f"{family}: {error}")

  print(f"device: {common.device_description()}; budget {memory_gib} GiB per device")
  common.print_table(rows, COLUMNS)
  path = common.write_json_to(_OUTPUT.value, dict(
      command=common.command_line(), device=common.device_description(), num_devices=num_devices, fsdp=_FSDP.value,
      memory_budget_gib=memory_gib, configs={family: dict(experiment=module.__name__, variant=variant, changes=changes)
                                             for family, (module, variant, changes) in BASE_CONFIGS.items()
                                             if family in _FAMILIES.value},
      note=f"per device, from the {jax.default_backend()} compiler's memory and cost analyses (a CPU compiler's "
           "temporaries were about twice a GPU's for the same steps, whose peak an H200 matched: see "
           "ddlm_jax/compile_check.py); FLOPs count a loop's body once, so a sampler's are one step of its loop",
      rows=rows))
  print(f"wrote {path}")
  if failures:
    sys.exit("\n".join(failures))


if __name__ == "__main__":
  app.run(main)
