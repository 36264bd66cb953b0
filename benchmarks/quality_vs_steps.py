"""Sample quality against the number of sampling steps, for every trained family.

  python -m benchmarks.quality_vs_steps --root=workdirs/compare --dataset=embedded

Loads workdirs ROOT/FAMILY_DATASET (trained by `benchmarks.compare_families`), samples
--num_samples texts at each step count, and judges them: generative perplexity under the trained
autoregressive model (ROOT/ar_DATASET), always beside the samples' unigram entropy, and on the
embedded corpus the share of samples the generator parses and its exact NLL of them. The
autoregressive model decodes one token per step (its step count is its length), so it is one
reference point. Writes benchmarks/results/quality_vs_steps_DATASET.{json,png}.
"""
import os

from absl import app
from absl import flags
from absl import logging

import ddlm_jax
from benchmarks import common
from ddlm_jax import evaluate
from ddlm_jax.data import corpus

_ROOT = flags.DEFINE_string("root", "workdirs/compare", "Parent of the trained workdirs.")
_DATASET = flags.DEFINE_string("dataset", "embedded", "The workdirs' dataset suffix.")
_FAMILIES = flags.DEFINE_list("families", ["mdlm", "udlm", "d3pm_absorbing", "d3pm_uniform"],
                              "Diffusion families to sample.")
_STEPS = flags.DEFINE_list("steps", ["4", "8", "16", "32", "64", "128"], "Sampling step counts.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 64, "Samples per point.")


def judge(model, texts, ar_model, reference_corpus) -> dict:
  quality = evaluate.sample_quality(texts, model.tokenizer.encode, ar_model=ar_model, corpus=reference_corpus)
  return {name: round(value, 4) if isinstance(value, float) else value
          for name, value in quality.summary().items()}


def plot(rows: list[dict], path: str) -> None:
  """`plots.quality_vs_steps` of the diffusion families, the AR model's own samples as the reference."""
  from ddlm_jax import plots  # pylint: disable=g-import-not-at-top
  points = {}
  for row in rows:
    if row["family"] != "ar":
      points.setdefault(row["family"], {})[row["steps"]] = row
  reference = next((row for row in rows if row["family"] == "ar"), None)
  plots.quality_vs_steps(points, reference=reference, reference_label="ar (one token per step)").savefig(path, dpi=120)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
  workdir = lambda family: os.path.join(_ROOT.value, f"{family}_{_DATASET.value}")
  ar_model = ddlm_jax.load(workdir("ar"))
  reference_corpus = corpus.default_corpus() if _DATASET.value == "embedded" else None
  rows = []
  ar_texts = ar_model.generate(num_samples=_NUM_SAMPLES.value, seed=1)
  rows.append(dict(family="ar", steps=ar_model.seq_len, **judge(ar_model, ar_texts, ar_model, reference_corpus)))
  for family in _FAMILIES.value:
    model = ddlm_jax.load(workdir(family))
    for steps in map(int, _STEPS.value):
      texts = model.generate(num_samples=_NUM_SAMPLES.value, steps=steps, strategy="ancestral", seed=1)
      rows.append(dict(family=family, steps=steps, **judge(model, texts, ar_model, reference_corpus)))
      print(rows[-1], flush=True)
  columns = ["family", "steps"] + [c for c in ("generative_perplexity", "unigram_entropy_bits",
                                               "well_formed_fraction", "generator_bits_per_document")
                                    if any(c in row for row in rows)]
  common.print_table([{c: row.get(c, "") for c in columns} for row in rows], columns)
  name = f"quality_vs_steps_{_DATASET.value}"
  print(f"wrote {common.write_json(name, dict(device=common.device_description(), rows=rows))}")
  png = os.path.join(common.RESULTS_DIR, f"{name}.png")
  plot(rows, png)
  print(f"wrote {png}")


if __name__ == "__main__":
  app.run(main)
