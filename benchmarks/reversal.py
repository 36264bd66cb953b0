"""Forward against reversal completion (LLaDA's poem table) for the AR baseline, masked and block diffusion
and the adapted model, zero-shot and after instruction tuning (`ddlm_jax.reversal` states the protocol).

  python -m benchmarks.reversal

Trains each `experiments/reversal.py` run whose workdir (--root/MODEL, --root/MODEL_sft) has no
checkpoint (the launcher commands in that file do the same), then asks every model about the
documents that pretraining showed hundreds of times and fine-tuning never showed in the instruction
format (the last NUM_DOCUMENTS - NUM_SFT_DOCUMENTS of the pretraining documents). Writes
benchmarks/results/reversal.json and prints the table. The anchor (Nie et al. 2025, Table 4,
Chinese poems): LLaDA 8B Instruct forward 51.8 / reversal 45.6, GPT-4o 82.7 / 34.3.
"""
import os
import time

from absl import app
from absl import flags
from absl import logging

import ddlm_jax
from benchmarks import common
from ddlm_jax import checkpoint
from ddlm_jax import reversal
from ddlm_jax import train
from ddlm_jax.data import corpus
from experiments import reversal as reversal_runs

_ROOT = flags.DEFINE_string("root", reversal_runs.ROOT, "Parent of the trained workdirs.")
_MODELS = flags.DEFINE_list("models", list(reversal_runs.MODELS), "Models to train and ask.")

NAMES = {"ar": "AR", "mdlm": "MDLM", "bd3lm": "BD3-LM (blocks of 4)", "adapted": "AR adapted to MDLM"}


def memorised_documents(config) -> list[str]:
  """The pretraining documents that fine-tuning never showed in the instruction format."""
  documents = corpus.default_corpus().sample(reversal_runs.NUM_DOCUMENTS,
                                             corpus.split_seed("train", config.data.seed))
  return [document.text for document in documents[reversal_runs.NUM_SFT_DOCUMENTS:]]


def trained(variant: str) -> tuple[str, float | None]:
  """The workdir of an `experiments/reversal.py` variant, trained first if it has no checkpoint."""
  workdir = os.path.join(_ROOT.value, variant.replace(",", "_"))
  if checkpoint.latest_step(workdir) is not None:
    return workdir, None
  config = reversal_runs.get_config(variant)
  if config.init_from:
    config.init_from = os.path.join(_ROOT.value, config.init_from.rsplit("/", 1)[1])
  config.train.sample_at_end = False
  start = time.perf_counter()
  train.train_and_evaluate(config, workdir)
  return workdir, time.perf_counter() - start


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  documents = memorised_documents(reversal_runs.get_config("ar"))
  rows = []
  for model_name in _MODELS.value:
    for fine_tuned in (False, True):
      workdir, train_s = trained(model_name + ",sft" * fine_tuned)
      model = ddlm_jax.load(workdir)
      row = {"model": NAMES[model_name], "format": "instruction" if fine_tuned else "zero_shot", "workdir": workdir,
             "train_s": None if train_s is None else round(train_s)}
      for direction in reversal.DIRECTIONS:
        if fine_tuned:
          result = reversal.instruction(model, documents, direction)
        elif direction == "reversal" and reversal.writes_left_to_right(model):
          continue
        else:
          result = reversal.zero_shot(model, documents, direction)
        row[direction] = result.summary()
        row[f"{direction}_examples"] = [{"output": output, "expected": expected}
                                        for output, expected in zip(result.outputs[:2], result.expected[:2])]
      rows.append(row)
      print(row)
  table = [{"model": row["model"], "format": row["format"],
            **{f"{direction} exact %": round(100 * row[direction]["exact_match"], 1) if direction in row else "—"
               for direction in reversal.DIRECTIONS},
            **{f"{direction} bits/token": row[direction]["bits_per_token"] if direction in row else "—"
               for direction in reversal.DIRECTIONS}} for row in rows]
  common.print_table(table, list(table[0]))
  print(f"wrote {common.write_json('reversal', dict(command=common.command_line(), device=common.device_description(), num_documents=len(documents), rows=rows))}")


if __name__ == "__main__":
  app.run(main)
