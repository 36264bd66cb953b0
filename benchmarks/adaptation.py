"""AR -> diffusion adaptation against masked diffusion from scratch, at equal total training steps.

  python -m benchmarks.adaptation --dataset=embedded --total_steps=1000
  python -m benchmarks.adaptation --dataset=shakespeare --text=PATH/TO/tinyshakespeare/input.txt --total_steps=1000
  python -m benchmarks.adaptation --dataset=embedded --total_steps=1000 --diffusion=bd3lm_4 --ar_shares=0,0.25

For each AR share s of --ar_shares: s = 0 is the --diffusion family (MDLM, or BD3-LM) trained from
scratch for N = --total_steps steps; s > 0 trains the autoregressive baseline for s N steps, then
adapts it to that family for the other (1 - s) N steps (`experiments/compare.py`'s model and optimizer, `config.init_from`, shifted
logits, attention annealed from causal to bidirectional over --anneal_steps). An AR step and a
masked step cost about the same here (README "Speed": 1.11), so equal steps are equal compute; the
wall time of each phase is reported too. Every model is scored on the same held-out rows (NELBO,
Monte Carlo over t, with its standard error and the one over sequences) and its samples judged by
an AR model trained for N steps (generative perplexity beside the unigram entropy, and on the
embedded corpus the generator's parse rate). Workdirs: ROOT/DATASET/total_N/...; results:
benchmarks/results/adaptation_DATASET.json (adaptation_DATASET_FAMILY.json for another family). An
adapted block model samples without a KV cache (cache 'none'), which a shifted network lacks.
"""
import os
import time

from absl import app
from absl import flags
from absl import logging

import ddlm_jax
from benchmarks import common
from ddlm_jax import evaluate
from ddlm_jax import train
from ddlm_jax.data import corpus
from experiments import compare

_DATASET = flags.DEFINE_enum("dataset", "embedded", compare.DATASETS, "Which data.")
_TEXT = flags.DEFINE_string("text", None, "The local text file of --dataset=shakespeare.")
_TOTAL_STEPS = flags.DEFINE_integer("total_steps", 1_000, "Training steps of every model, AR phase included.")
_AR_SHARES = flags.DEFINE_list("ar_shares", ["0", "0.25", "0.5", "0.75"], "Shares of the steps spent on AR.")
_ANNEAL_STEPS = flags.DEFINE_integer("anneal_steps", 100, "Steps over which attention is annealed to bidirectional.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 64, "Samples judged per model.")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 64, "Sampling steps of the masked models.")
_ROOT = flags.DEFINE_string("root", "workdirs/adaptation", "Parent of the workdirs.")
_DIFFUSION = flags.DEFINE_enum("diffusion", "mdlm", ["mdlm", "bd3lm_4", "bd3lm_8", "bd3lm_16"],
                               "The diffusion family (experiments/compare.py) trained from scratch and adapted to.")
NAMES = {"mdlm": "MDLM", "bd3lm_4": "BD3-LM 4", "bd3lm_8": "BD3-LM 8", "bd3lm_16": "BD3-LM 16"}


def base_config(family: str, num_steps: int):
  config = compare.get_config(f"{family},{_DATASET.value}")
  if _TEXT.value:
    config.data.paths = (_TEXT.value,)
  config.train.update(num_steps=num_steps, eval_every=10 * num_steps, sample_at_end=False)
  return config


def trained(config, workdir: str) -> tuple[dict, float]:
  """(summary, wall seconds) of training `config` in `workdir` (a finished run only re-evaluates)."""
  start = time.perf_counter()
  summary = train.train_and_evaluate(config, workdir)
  return summary, time.perf_counter() - start


def judged(workdir: str, judge: ddlm_jax.Pipeline) -> dict:
  model = ddlm_jax.load(workdir)
  steps = {} if model.config.process.name == "block" else {"steps": _SAMPLE_STEPS.value}
  texts = model.generate(None, num_samples=_NUM_SAMPLES.value, seed=1, **steps)
  reference = corpus.default_corpus() if _DATASET.value == "embedded" else None
  quality = evaluate.sample_quality(texts, model.tokenizer.encode, ar_model=judge, corpus=reference)
  return {name: round(value, 4) if isinstance(value, float) else value for name, value in quality.summary().items()}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _DATASET.value == "shakespeare" and not _TEXT.value:
    raise app.UsageError("--dataset=shakespeare needs --text=PATH")
  total = _TOTAL_STEPS.value
  # Workdirs named by every setting that shapes them, so a rerun with others trains afresh.
  root = os.path.join(_ROOT.value, _DATASET.value, f"total_{total}")
  judge_summary, judge_seconds = trained(base_config("ar", total), os.path.join(root, f"ar_{total}"))
  judge = ddlm_jax.load(os.path.join(root, f"ar_{total}"))
  rows = [dict(model=f"AR, {total} steps (the judge)", ar_steps=total, diffusion_steps=0,
               bits_per_token=round(judge_summary["bits_per_token"], 4), stderr=0.0,
               stderr_over_sequences=round(judge_summary["bits_per_token_stderr_over_sequences"], 4),
               wall_s=round(judge_seconds))]
  for share in map(float, _AR_SHARES.value):
    ar_steps = round(share * total)
    family = _DIFFUSION.value
    config = base_config(family, total - ar_steps)
    seconds = 0.0
    if ar_steps:
      ar_workdir = os.path.join(root, f"ar_{ar_steps}")
      _, seconds = trained(base_config("ar", ar_steps), ar_workdir)
      config.init_from = ar_workdir
      config.model.shift_logits = True
      config.train.attention_anneal_steps = _ANNEAL_STEPS.value
      if config.process.name == "block":
        config.sample.cache = "none"
    workdir = os.path.join(root, f"{family}_after_ar_{ar_steps}_anneal_{_ANNEAL_STEPS.value}" if ar_steps
                           else f"{family}_from_scratch")
    summary, adapt_seconds = trained(config, workdir)
    row = dict(model=f"AR {ar_steps} + adaptation {total - ar_steps}" if ar_steps
               else f"{NAMES[family]} from scratch, {total}",
               ar_steps=ar_steps, diffusion_steps=total - ar_steps,
               bits_per_token=round(summary["bits_per_token"], 4), stderr=round(summary["bits_per_token_stderr"], 4),
               stderr_over_sequences=round(summary["bits_per_token_stderr_over_sequences"], 4),
               wall_s=round(seconds + adapt_seconds), **judged(workdir, judge))
    if "bits_per_char" in summary:
      row["bits_per_char"] = round(summary["bits_per_char"], 4)
    rows.append(row)
  columns = list(dict.fromkeys(column for row in rows for column in row))
  common.print_table([{c: row.get(c, "") for c in columns} for row in rows], columns)
  payload = dict(device=common.device_description(), command=common.command_line(), dataset=_DATASET.value,
                 anneal_steps=_ANNEAL_STEPS.value, rows=rows, judge_steps=total,
                 diffusion=_DIFFUSION.value, base_config=base_config(_DIFFUSION.value, total).to_dict())
  if "generator_bits_per_token" in judge_summary:
    payload["generator_bits_per_token"] = round(judge_summary["generator_bits_per_token"], 4)
  name = f"adaptation_{_DATASET.value}" + (f"_{_DIFFUSION.value}" if _DIFFUSION.value != "mdlm" else "")
  print(f"wrote {common.write_json(name, payload)}")


if __name__ == "__main__":
  app.run(main)
