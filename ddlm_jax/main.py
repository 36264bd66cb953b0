"""Launcher: flags only. Everything else is in train.train_and_evaluate and pipeline.load.

  python -m ddlm_jax.main --config=experiments/mdlm_tiny.py --workdir=/tmp/run \
      [--config.model.num_layers=2] [--mode=train|eval|sample] [--prompt="The Golden"]

Each --prompt is continued config.sample.num_samples times (for a model trained on a pair task,
each prompt is a source and gets that many targets); without --prompt, a language model samples
num_samples texts from scratch and a pair model translates the first num_samples held-out sources.

A mistake in the flags, the config, the data or the workdir ends the run with one line on stderr
and exit status 1; `-v 1` or DDLM_TRACEBACK=1 shows the traceback instead.
"""
import json
import os
import sys
from typing import NoReturn

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ddlm_jax import config as config_lib
from ddlm_jax import pipeline
from ddlm_jax import train
from ddlm_jax.data import datasets

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, tokenizer, data and logs.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"],
                          "train: train or resume, then evaluate (and sample, unless "
                          "config.train.sample_at_end is False); eval: held-out ELBO of "
                          "the latest checkpoint; sample: print samples from it.")
_PROMPTS = flags.DEFINE_multi_string("prompt", None, "Prompt(s) (sources of a pair task) for --mode=sample; "
                                     "each is sampled config.sample.num_samples times.")
flags.mark_flags_as_required(["config", "workdir"])

TRACEBACK_ENV = "DDLM_TRACEBACK"
# What a user's settings, data or workdir cause (the library's messages name the setting to change).
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def _show_tracebacks() -> bool:
  verbose = flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1
  return verbose or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def _exit_with(message: str, flags_parsed: bool = True) -> NoReturn:
  """Exits with status 1 after one line on stderr (and how to see the traceback)."""
  switches = f"-v 1 or {TRACEBACK_ENV}=1" if flags_parsed else f"{TRACEBACK_ENV}=1"
  sys.exit(f"error: {' '.join(message.split())}\n({switches} shows the traceback)")


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # libraries log every checkpoint at INFO; -v 0 shows them
    logging.set_verbosity(logging.WARNING)
  try:
    run(_CONFIG.value, _WORKDIR.value, _MODE.value, _PROMPTS.value)
  except USER_ERRORS as error:
    if _show_tracebacks():
      raise
    _exit_with(f"{type(error).__name__}: {error}")


def run(config, workdir: str, mode: str, prompts: list[str] | None) -> None:
  """Trains, evaluates or samples as `mode` says and writes workdir/<mode>_summary.json."""
  if mode == "train":
    summary = train.train_and_evaluate(config, workdir)
    if "stopped" in summary:
      return
  sampling = mode == "sample" or (mode == "train" and config.train.sample_at_end)
  model = pipeline.load(workdir) if mode == "eval" or sampling else None
  if mode == "eval":
    result = model.evaluate(workdir, num_samples=config.eval.elbo_samples, exact_time_sum=config.eval.exact_time_sum,
                            max_docs=config.eval.max_docs, rows=config.eval.rows)
    summary = {"params": model.params_name, **result.summary()}
    print(f"{model.params_name} parameters, {result.describe()}")
  if sampling:
    sample = config.sample.to_dict()
    num_samples = sample.pop("num_samples")
    repeated = [prompt for prompt in prompts for _ in range(num_samples)] if prompts else None
    if config.data.task == "lm":
      texts = model.generate(repeated, num_samples=num_samples, seed=config.seed, **sample)
    else:
      sources = repeated or datasets.load_data(config_lib.data_config(config), workdir).eval_sources[:num_samples]
      texts = [f"{source} -> {target}"
               for source, target in zip(sources, model.translate(sources, seed=config.seed, **sample))]
    print("samples:\n" + "\n".join(f"  {i}. {text}" for i, text in enumerate(texts)))
    summary = {**summary, "samples": texts} if mode == "train" else {"samples": texts}
  with open(os.path.join(workdir, f"{mode}_summary.json"), "w") as f:
    json.dump(summary, f, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
