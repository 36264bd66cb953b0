"""Supervised fine-tuning from the pretrained language models: how well each answers instruction prompts.

  python -m ddlm_jax.main --config=experiments/sft.py:mdlm --workdir=workdirs/sft/mdlm
  python -m ddlm_jax.main --config=experiments/sft.py:ar --workdir=workdirs/sft/ar
  python -m benchmarks.sft

For every trained workdir ROOT/FAMILY (`experiments/sft.py`, task 'instructions'): answers the first
--num_pairs held-out prompts, even-numbered ones asking for the description of a record (scored by
corpus BLEU against the reference and the share the generator parses with exactly the prompt's
record), odd-numbered ones for the record of a description (exact-match and per-attribute accuracy),
as `benchmarks.seq2seq` scores them (`common.pair_scores`). The masked model decodes with --steps steps, the AR model
greedily. Writes benchmarks/results/sft.json.
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

_ROOT = flags.DEFINE_string("root", "workdirs/sft", "Parent of the trained workdirs.")
_FAMILIES = flags.DEFINE_list("families", ["mdlm", "ar"], "Families to score.")
_NUM_PAIRS = flags.DEFINE_integer("num_pairs", 128, "Held-out prompts per model (half of each direction).")
_STEPS = flags.DEFINE_integer("steps", 64, "Sampling steps of the masked model.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  reference, rows = corpus.default_corpus(), []
  for family in _FAMILIES.value:
    workdir = os.path.join(_ROOT.value, family)
    model = ddlm_jax.load(workdir)
    data = datasets.load_data(config_lib.data_config(model.config), workdir)
    n = _NUM_PAIRS.value
    settings = dict(temperature=0.0) if family == "ar" else dict(steps=_STEPS.value)
    outputs = model.translate(data.eval_sources[:n], seed=1, **settings)
    row = {"family": family, "pretrained": model.provenance.get("workdir", "")}
    for direction, parity in (("data_to_text", 0), ("text_to_data", 1)):
      chosen = slice(parity, n, 2)
      sources = [source[len(datasets.INSTRUCTIONS[direction]):] for source in data.eval_sources[chosen]]
      row[direction] = common.pair_scores(direction, outputs[chosen], sources, data.eval_targets[chosen],
                                     data.eval_records[chosen], reference)
    row["examples"] = [{"prompt": data.eval_sources[i], "answer": outputs[i]} for i in range(2)]
    rows.append(row)
    print(row)
  print(f"wrote {common.write_json('sft', dict(command=common.command_line(), num_pairs=_NUM_PAIRS.value, steps=_STEPS.value, device=common.device_description(), rows=rows))}")


if __name__ == "__main__":
  app.run(main)
