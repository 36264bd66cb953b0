"""Launcher: flags only. Everything else is in train.train_and_evaluate and pipeline.load.

  python -m ddlm_jax.main --config=experiments/mdlm_tiny.py --workdir=/tmp/run \
      [--config.model.num_layers=2] [--mode=train|eval|sample] [--prompt="The Golden"]

For a model trained on a pair task (config.data.task), samples are the targets of the prompts, or
of the first held-out sources when no --prompt is given.
"""
import json
import os

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
                          "train: train or resume, then evaluate and sample; eval: held-out ELBO of "
                          "the latest checkpoint; sample: print samples from it.")
_PROMPTS = flags.DEFINE_multi_string("prompt", None, "Prompt(s) (sources of a pair task) for --mode=sample.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # libraries log every checkpoint at INFO; -v 0 shows them
    logging.set_verbosity(logging.WARNING)
  config, workdir = _CONFIG.value, _WORKDIR.value
  if _MODE.value == "train":
    summary = train.train_and_evaluate(config, workdir)
    if "stopped" in summary:
      return
  model = pipeline.load(workdir)
  if _MODE.value == "eval":
    result = model.evaluate(workdir, num_samples=config.eval.elbo_samples, exact_time_sum=config.eval.exact_time_sum,
                            max_docs=config.eval.max_docs)
    summary = result.summary()
    print(result.describe())
  if _MODE.value in ("train", "sample"):
    sample = config.sample.to_dict()
    if config.data.task == "lm":
      texts = model.generate(_PROMPTS.value, seed=config.seed, **sample)
    else:
      sources = _PROMPTS.value or datasets.load_data(config_lib.data_config(config), workdir).eval_sources
      sources = sources[:sample.pop("num_samples")]
      texts = [f"{source} -> {target}"
               for source, target in zip(sources, model.translate(sources, seed=config.seed, **sample))]
    print("samples:\n" + "\n".join(f"  {i}. {text}" for i, text in enumerate(texts)))
    summary = {**summary, "samples": texts} if _MODE.value == "train" else {"samples": texts}
  with open(os.path.join(workdir, f"{_MODE.value}_summary.json"), "w") as f:
    json.dump(summary, f, indent=2)


if __name__ == "__main__":
  app.run(main)
