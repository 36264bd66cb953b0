"""Sequence to sequence on held-out pairs of the embedded corpus: BLEU and exact-attribute accuracy.

  python -m ddlm_jax.main --config=experiments/seq2seq.py:FAMILY[,TASK] --workdir=workdirs/seq2seq/FAMILY_TASK
  python -m benchmarks.seq2seq

For every trained workdir ROOT/FAMILY_TASK (FAMILY diffuseq, mdlm, ar; TASK data_to_text,
text_to_data): translates the first --num_pairs held-out sources and scores the outputs.
- 'data_to_text': corpus BLEU against the reference texts (sacrebleu), plus the share of outputs
  the generator parses with exactly the source record.
- 'text_to_data': exact-match and per-attribute accuracy of the parsed records.
Diffusion families decode once and with minimum-Bayes-risk selection over --mbr candidates; the
AR baseline decodes greedily. Writes benchmarks/results/seq2seq_TASK.json.
"""
import os

from absl import app
from absl import flags
from absl import logging

import ddlm_jax
from benchmarks import common
from ddlm_jax import config as config_lib
from ddlm_jax.data import corpus
from ddlm_jax.data import datasets

_ROOT = flags.DEFINE_string("root", "workdirs/seq2seq", "Parent of the trained workdirs.")
_FAMILIES = flags.DEFINE_list("families", ["diffuseq", "mdlm", "ar"], "Families to score.")
_TASKS = flags.DEFINE_list("tasks", ["data_to_text", "text_to_data"], "Tasks to score.")
_NUM_PAIRS = flags.DEFINE_integer("num_pairs", 64, "Held-out pairs per model.")
_MBR = flags.DEFINE_integer("mbr", 4, "MBR candidates of the diffusion families.")
_STEPS = flags.DEFINE_integer("steps", 100, "Sampling steps of the diffusion families.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  reference = corpus.default_corpus()
  for task in _TASKS.value:
    rows = []
    for family in _FAMILIES.value:
      workdir = os.path.join(_ROOT.value, f"{family}_{task}")
      if not os.path.isdir(workdir):
        print(f"skipping {workdir}: not trained")
        continue
      model = ddlm_jax.load(workdir)
      data = datasets.load_data(config_lib.data_config(model.config), workdir)
      n = _NUM_PAIRS.value
      sources, targets, records = data.eval_sources[:n], data.eval_targets[:n], data.eval_records[:n]
      candidate_counts = [1] if family == "ar" else sorted({1, _MBR.value})
      for candidates in candidate_counts:
        settings = {} if family == "ar" else dict(steps=_STEPS.value)
        outputs = model.translate(sources, num_candidates=candidates, seed=1, **settings)
        rows.append({"task": task, "family": family, "mbr_candidates": candidates,
                     **common.pair_scores(task, outputs, sources, targets, records, reference),
                     "example": {"source": sources[0], "output": outputs[0], "reference": targets[0]}})
        print(rows[-1])
    path = common.write_json(f"seq2seq_{task}", {"num_pairs": _NUM_PAIRS.value, "steps": _STEPS.value,
                                                  "device": common.device_description(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
