"""Launcher of ddlm_jax: trains, evaluates or samples an experiment config in a workdir.

  python -m ddlm_jax.main --config=experiments/mdlm_tiny.py --workdir=/tmp/run
  python -m ddlm_jax.main --config=experiments/mdlm_tiny.py --workdir=/tmp/run --mode=sample --prompt="The Golden"
  python -m ddlm_jax.main --config=experiments/mdlm_tiny.py --mode=show_config --config.model.num_layers=4
  python -m ddlm_jax.main --config=experiments/compare.py:mdlm,embedded,base --mode=compile_check

Every key of the config can be set with --config.KEY=VALUE (e.g. --config.train.num_steps=500
--config.data.source=text_files --config.data.paths="('my.txt',)"); --mode=show_config prints them
all with their values and exits. A config file's `:variant` picks a variant
(--config=experiments/mdlm_tiny.py:char). --mode=compile_check compiles the train step and the sampler
for the devices it runs on (all processes of a pod slice), without training, prints what one device
needs, and fails if that is over --memory_gib (default: the memory the device reports).

Each --prompt is continued config.sample.num_samples times (for a model trained on a pair task,
each prompt is a source and gets that many targets); without --prompt, a language model samples
num_samples texts from scratch and a pair model translates the first num_samples held-out sources.

Several processes (a TPU pod slice, or machines of GPUs) run the same command, each with
--coordinator_address=HOST:PORT (of process 0) --num_processes=N --process_id=I, or with these in
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; on a TPU pod, Slurm or Open MPI,
--config.multi_process=True alone lets JAX detect them. Only process 0 prints and writes summaries.

Exit status: 0 when done; 143 when training stopped on SIGTERM and 130 on SIGINT (Ctrl-C), after
saving a checkpoint (the same command resumes); 75 when another run holds the workdir (try again when
it has ended); 1 for a mistake in the flags, the config, the data or the workdir, reported in one line
on stderr (`-v 1` or DDLM_TRACEBACK=1 shows the traceback).
"""
import json
import os
import signal
import sys
from typing import NoReturn

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from ddlm_jax import checkpoint
from ddlm_jax import compile_check
from ddlm_jax import config as config_lib
from ddlm_jax import pipeline
from ddlm_jax import sharding
from ddlm_jax import train
from ddlm_jax.data import datasets
from ddlm_jax.data import tokenizers

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (experiments/NAME.py[:variant]); set any of its keys with "
    "--config.KEY=VALUE, list them with --mode=show_config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, tokenizer, data and logs "
                               "(required except for --mode=show_config and --mode=compile_check).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample", "show_config", "compile_check"],
                          "train: train or resume, then evaluate (and sample, unless "
                          "config.train.sample_at_end is False); eval: held-out ELBO of "
                          "the latest checkpoint; sample: print samples from it; show_config: print "
                          "every key of the config (after the --config.KEY=VALUE overrides) and exit; "
                          "compile_check: compile the train step and the sampler for these devices without "
                          "training and report what one device needs.")
_MEMORY_GIB = flags.DEFINE_float("memory_gib", None, "--mode=compile_check fails if a device needs more GiB than "
                                  "this (default: the memory the device reports; none on a CPU).", lower_bound=0)
_PROMPTS = flags.DEFINE_multi_string("prompt", None, "Prompt(s) (sources of a pair task) for --mode=sample; "
                                     "each is sampled config.sample.num_samples times.")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs: HOST:PORT of process 0's coordinator, the same for "
    "every process (default: $JAX_COORDINATOR_ADDRESS; detected on a TPU pod, Slurm or Open MPI).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many processes "
                                      "(default: $JAX_NUM_PROCESSES; detected on a pod).", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index, 0 to "
                                   "num_processes - 1 (default: $JAX_PROCESS_ID; detected on a pod).", lower_bound=0)
WITHOUT_WORKDIR = ("show_config", "compile_check")
flags.mark_flag_as_required("config")
flags.register_multi_flags_validator(
    ["workdir", "mode"], lambda values: values["workdir"] is not None or values["mode"] in WITHOUT_WORKDIR,
    "--workdir is required (except for --mode=show_config and --mode=compile_check)")

TRACEBACK_ENV = "DDLM_TRACEBACK"
# Exit status of a run that training stopped early, by the reason `train_and_evaluate` returns: 128 + the
# signal's number, as a shell reports a process the signal ended, so that a scheduler can tell a preempted run
# from a finished one.
STOPPED_EXIT_STATUS = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}
# Exit status when another run holds the workdir: sysexits' EX_TEMPFAIL (try again later), so that a scheduler
# that started a run twice can tell this from a mistake in the settings.
WORKDIR_IN_USE_EXIT_STATUS = 75
# What a user's settings, data or workdir cause (the library's messages name the setting to change).
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def _show_tracebacks() -> bool:
  verbose = flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1
  return verbose or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def _exit_with(message: str, flags_parsed: bool = True, status: int = 1) -> NoReturn:
  """Exits with `status` after one line on stderr (and how to see the traceback)."""
  switches = f"-v 1 or {TRACEBACK_ENV}=1" if flags_parsed else f"{TRACEBACK_ENV}=1"
  print(f"error: {' '.join(message.split())}\n({switches} shows the traceback)", file=sys.stderr)
  sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a flag it cannot apply (a missing one, an unknown --config.* key, a
  value of the wrong type) reported in one line."""
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # absl raises flags.Error; ml_collections KeyError, AttributeError, ...
    if _show_tracebacks():
      raise
    cause = error
    while cause.args and isinstance(cause.args[0], Exception):  # ml_collections wraps its KeyError
      cause = cause.args[0]
    detail = cause.args[0] if cause.args and isinstance(cause.args[0], str) else str(cause)
    _exit_with(f"cannot apply the flags {' '.join(argv[1:])}: {detail}", flags_parsed=False)


def show_config(config) -> str:
  """Every key of `config` with its value, one `KEY = VALUE` line each, sorted."""
  def lines(values: dict, prefix: str):
    for key, value in sorted(values.items()):
      if isinstance(value, dict):
        yield from lines(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key} = {value!r}"
  return "\n".join(lines(config.to_dict(), "config."))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # libraries log every checkpoint at INFO; -v 0 shows them
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  try:
    config_lib.validate(config)  # before the processes meet: a bad config fails on each at once
    if _MODE.value == "show_config":
      print(show_config(config))
      return
    group = sharding.ProcessGroup.from_environment(coordinator_address=_COORDINATOR_ADDRESS.value,
                                                   num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    sharding.init_distributed(config.multi_process, group)
    if _MODE.value == "compile_check":
      check_compiled_size(config, _WORKDIR.value, _MEMORY_GIB.value)
      return
    summary = run(config, _WORKDIR.value, _MODE.value, _PROMPTS.value)
  except USER_ERRORS as error:
    if _show_tracebacks():
      raise
    in_use = isinstance(error, checkpoint.WorkdirInUse)
    _exit_with(f"{type(error).__name__}: {error}", status=WORKDIR_IN_USE_EXIT_STATUS if in_use else 1)
  except KeyboardInterrupt:
    summary = {"stopped": "SIGINT"}
  if "stopped" in summary:
    where = f"at step {summary['step']} " if "step" in summary else ""
    print(f"training stopped {where}by {summary['stopped']}; the same command resumes from the workdir's latest "
          "checkpoint", file=sys.stderr)
    sys.exit(STOPPED_EXIT_STATUS[summary["stopped"]])


def check_compiled_size(config, workdir: str | None, memory_gib: float | None) -> None:
  """Prints what one device needs for the config's train step and sampler (`compile_check`), and
  raises MemoryBudgetError over `memory_gib` (None: the first device's reported memory, if any). A
  character tokenizer's vocabulary comes from the workdir's tokenizer (it is built from the texts)."""
  tokenizer_dir = os.path.join(workdir, "tokenizer") if workdir else None
  vocab_size = None
  if config.data.tokenizer != "sentencepiece":
    if not (tokenizer_dir and os.path.isdir(tokenizer_dir)):
      raise ValueError(f"a {config.data.tokenizer!r} tokenizer's vocabulary is known only once it is built from the "
                       "texts: give the --workdir of a run that built it, or check with "
                       "--config.data.tokenizer=sentencepiece (its vocabulary is config.data.vocab_size)")
    vocab_size = tokenizers.load_tokenizer(tokenizer_dir).vocab_size
  report = compile_check.compile_report(config, vocab_size)
  _print(report.describe())
  if memory_gib is None:
    reported = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")  # another process's: no stats
    memory_gib = reported / compile_check.GIB if reported else None
  if memory_gib is not None:
    compile_check.check_budget(report, memory_gib)
    _print(f"fits {memory_gib:.2f} GiB per device")


def run(config, workdir: str, mode: str, prompts: list[str] | None) -> dict:
  """Trains, evaluates or samples as `mode` says; returns the summary that process 0 writes to
  workdir/<mode>_summary.json (training stopped early: {'step', 'stopped'}, nothing written).
  Every process of a multi-process run calls it alike."""
  if mode == "train":
    summary = train.train_and_evaluate(config, workdir)
    if "stopped" in summary:
      return summary
  sampling = mode == "sample" or (mode == "train" and config.train.sample_at_end)
  model = pipeline.load(workdir) if mode == "eval" or sampling else None
  if mode == "eval":
    result = model.evaluate(workdir, num_samples=config.eval.elbo_samples, exact_time_sum=config.eval.exact_time_sum,
                            max_docs=config.eval.max_docs, rows=config.eval.rows)
    summary = {"params": model.params_name, **result.summary()}
    _print(f"{model.params_name} parameters, {result.describe()}")
  if sampling:
    held_out = config.data.task != "lm" and not prompts  # a pair model translates held-out sources
    sources = datasets.load_data(config_lib.data_config(config), workdir).eval_sources if held_out else []
    texts = train.sample_texts(model, config, sources, prompts)
    _print("samples:\n" + "\n".join(f"  {i}. {text}" for i, text in enumerate(texts)))
    summary = {**summary, "samples": texts} if mode == "train" else {"samples": texts}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f"{mode}_summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def _print(text: str) -> None:
  """Prints on process 0 only (every process has the same results)."""
  if jax.process_index() == 0:
    print(text, flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
