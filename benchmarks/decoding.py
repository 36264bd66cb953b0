"""Every decoding method on one speed/quality chart: AR with its KV cache, the masked model's scan
sampler, first-hitting sampler and cached threshold decoding, block diffusion with its exact cache,
and speculative diffusion decoding.

  python -m benchmarks.compare_families --dataset=embedded --num_steps=500 \
      --families=ar,mdlm,bd3lm_4,bd3lm_8,bd3lm_16
  python -m benchmarks.decoding --root=workdirs/compare

Loads the models trained on the embedded corpus with the same budget (ROOT/FAMILY_embedded) and
samples from scratch (canvas = the training length, rows stop at their [EOS]) with each method at
batch 1 and batch 16. Per method and batch size: tokens/s (generated tokens through [EOS], over the
wall time of jitted runs, compilation excluded and reported on its own), network calls per token
(per row: the batch's calls over its mean generated length), and, from the batch-16 samples, the
quality: generative perplexity under the AR model, unigram entropy beside it, the share of samples
the corpus generator parses and its exact NLL of those. Writes benchmarks/results/decoding.{json,png};
with --methods, the rows of those methods replace theirs in the existing results (each row keeps the
command that measured it).
"""
import dataclasses
import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging

import ddlm_jax
from benchmarks import common
from ddlm_jax import evaluate
from ddlm_jax import experiment
from ddlm_jax import samplers
from ddlm_jax.data import corpus
from ddlm_jax.decoding import blockwise
from ddlm_jax.decoding import speculative
from ddlm_jax.networks import transformer
from ddlm_jax.processes import base

_ROOT = flags.DEFINE_string("root", "workdirs/compare", "Parent of the trained workdirs (FAMILY_embedded).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 64, "Samples at batch 16 (quality and speed).")
_BATCH1_SAMPLES = flags.DEFINE_integer("batch1_samples", 8, "Samples timed at batch 1.")
_METHODS = flags.DEFINE_list("methods", [], "Only these methods (keys of METHODS); empty: all.")
_OUTPUT = common.define_output_flag("decoding")


@dataclasses.dataclass(frozen=True)
class Method:
  """One decoding method: its model (a FAMILY of the workdirs), its kind and its settings."""
  key: str
  name: str
  model: str
  kind: str  # 'ar' | 'scan' | 'blockwise' | 'speculative'
  settings: tuple = ()
  drafter: str = ""


METHODS = [
    Method("ar", "AR, KV cache", "ar", "ar"),
    Method("mdlm_scan", "MDLM scan, ancestral 64 steps", "mdlm", "scan", (("steps", 64), ("strategy", "ancestral"))),
    Method("mdlm_first_hitting", "MDLM first-hitting", "mdlm", "scan", (("strategy", "first_hitting"),)),
    Method("mdlm_none_lc", "MDLM windows of 16, no cache, low-confidence 8 steps", "mdlm", "blockwise",
           (("block_size", 16), ("steps_per_block", 8), ("cache", "none"))),
    Method("mdlm_dual_lc", "MDLM windows of 16, dual cache, low-confidence 8 steps", "mdlm", "blockwise",
           (("block_size", 16), ("steps_per_block", 8), ("cache", "dual"))),
    Method("mdlm_none_threshold", "MDLM windows of 16, no cache, threshold 0.9", "mdlm", "blockwise",
           (("block_size", 16), ("rule", "threshold"), ("threshold", 0.9), ("cache", "none"))),
    Method("mdlm_prefix_threshold", "MDLM windows of 16, prefix cache, threshold 0.9", "mdlm", "blockwise",
           (("block_size", 16), ("rule", "threshold"), ("threshold", 0.9), ("cache", "prefix"))),
    *[Method(f"mdlm_dual_threshold{tau}", f"MDLM windows of 16, dual cache, threshold {tau}", "mdlm", "blockwise",
             (("block_size", 16), ("rule", "threshold"), ("threshold", tau), ("cache", "dual")))
      for tau in (0.9, 0.5)],
    Method("mdlm_dual_factor", "MDLM windows of 16, dual cache, factor 1", "mdlm", "blockwise",
           (("block_size", 16), ("rule", "factor"), ("factor", 1.0), ("cache", "dual"))),
    Method("mdlm_dual_eb", "MDLM windows of 16, dual cache, entropy bound 0.5", "mdlm", "blockwise",
           (("block_size", 16), ("rule", "entropy_bound"), ("entropy_bound", 0.5), ("cache", "dual"))),
    *[Method(f"bd3lm{size}_{key}", f"BD3-LM {size}, exact cache, {label}", f"bd3lm_{size}", "blockwise",
             (("block_size", size), ("cache", "exact"), *settings))
      for size in (4, 8, 16)
      for key, label, settings in [("ancestral", f"ancestral {size} steps",
                                    (("rule", "ancestral"), ("steps_per_block", size))),
                                   *[(f"threshold{tau}", f"threshold {tau}", (("rule", "threshold"), ("threshold", tau)))
                                     for tau in (0.9, 0.7, 0.5)]]],
    Method("speculative_mdlm", "Speculative: AR + MDLM drafter, gamma 4, 2 steps", "ar", "speculative",
           (("draft_length", 4), ("draft_steps", 2)), drafter="mdlm"),
    Method("speculative_bd3lm4", "Speculative: AR + BD3-LM 4 drafter, gamma 4, 2 steps", "ar", "speculative",
           (("draft_length", 4), ("draft_steps", 2)), drafter="bd3lm_4"),
]


def generated_lengths(tokens_BL: np.ndarray, eos_id: int) -> np.ndarray:
  """Tokens each row generated: through its first [EOS], or the whole canvas without one."""
  has_eos_B = (tokens_BL == eos_id).any(axis=1)
  return np.where(has_eos_B, np.argmax(tokens_BL == eos_id, axis=1) + 1, tokens_BL.shape[1])


def make_run(method: Method, models: dict, batch_size: int) -> Callable:
  """A jitted key -> (tokens int32[B, L], network calls int32, accepted drafts float32 or -1)."""
  model = models[method.model]
  settings = dict(method.settings)
  length, eos_id, pad_id = model.seq_len, model.tokenizer.eos_id, model.tokenizer.pad_id
  fixed_BL = jnp.zeros((batch_size, length), bool)
  free_tokens_BL = jnp.zeros((batch_size, length), jnp.int32)
  special = dict(eos_id=eos_id, pad_id=pad_id)
  graphdef = model.graphdef
  none = jnp.float32(-1)

  if method.kind in ("ar", "scan"):
    sampler_config = samplers.SamplerConfig(**settings)

    def run(params, key):
      tokens_BL = experiment.generate_tokens(graphdef, params, model.process, sampler_config, free_tokens_BL,
                                             fixed_BL, key, **special)
      if method.kind == "ar":  # the loop ran to the batch's last [EOS]
        ends_B = jnp.where((tokens_BL == eos_id).any(axis=1), jnp.argmax(tokens_BL == eos_id, axis=1) + 1, length)
        return tokens_BL, ends_B.max(), none
      calls = length if sampler_config.strategy == "first_hitting" else sampler_config.steps
      return tokens_BL, jnp.int32(calls), none
  elif method.kind == "blockwise":
    config = blockwise.BlockwiseConfig(**settings)

    def run(params, key):
      network = blockwise.Network(experiment.bind(graphdef, params))
      if config.cache != "none":
        cache, step_fn = transformer.make_decoder(graphdef, params, batch_size, length)
        network = blockwise.Network(network.model_fn, step_fn, cache)
      tokens_BL, stats = blockwise.decode_blocks(network, model.process, config, free_tokens_BL, fixed_BL, key,
                                                 **special)
      return tokens_BL, stats["network_calls"], none
  else:
    drafter_model = models[method.drafter]
    config = speculative.SpeculativeConfig(**settings, draw=base.TokenDraw())

    def run(params, key):
      cache, step_fn = transformer.make_decoder(graphdef, params[0], batch_size, length)
      drafter = speculative.diffusion_drafter(experiment.bind(drafter_model.graphdef, params[1]),
                                              drafter_model.process)
      tokens_BL, stats = speculative.speculative_decode(step_fn, cache, model.process, drafter, config,
                                                        free_tokens_BL, fixed_BL, key, **special)
      return tokens_BL, stats.rounds + stats.drafter_calls, stats.mean_accepted_length_B.mean()
    jitted = jax.jit(run)
    return lambda key: jitted((model.params, drafter_model.params), key)
  jitted = jax.jit(run)
  return lambda key: jitted(model.params, key)


def measure(method: Method, models: dict, batch_size: int, num_samples: int) -> dict:
  """Runs num_samples / batch_size batches after a compiling one; speed and the samples."""
  run = make_run(method, models, batch_size)
  start = time.perf_counter()
  jax.block_until_ready(run(jax.random.key(10_000)))
  first_s = time.perf_counter() - start
  tokens, calls, accepted, wall_s = [], [], [], 0.0
  for batch in range(num_samples // batch_size):
    start = time.perf_counter()
    tokens_BL, num_calls, mean_accepted = jax.block_until_ready(run(jax.random.key(batch)))
    wall_s += time.perf_counter() - start
    tokens.append(np.asarray(tokens_BL))
    calls.append(int(num_calls))
    accepted.append(float(mean_accepted))
  tokens_NL = np.concatenate(tokens)
  eos_id = models[method.model].tokenizer.eos_id
  lengths_N = generated_lengths(tokens_NL, eos_id)
  row = dict(tokens_per_s=round(float(lengths_N.sum() / wall_s), 1),
             compile_s=round(first_s - wall_s / len(calls), 2),
             calls_per_token=round(float(sum(calls) / (lengths_N.sum() / batch_size)), 3),
             mean_length=round(float(lengths_N.mean()), 2))
  if accepted[0] >= 0:
    row["mean_accepted_length"] = round(float(np.mean(accepted)), 3)
  return row, tokens_NL


def judge(tokens_NL: np.ndarray, model, ar_model, reference_corpus) -> dict:
  texts = [model.tokenizer.decode(row) for row in tokens_NL.tolist()]
  quality = evaluate.sample_quality(texts, model.tokenizer.encode, ar_model=ar_model, corpus=reference_corpus)
  return {name: round(value, 4) if isinstance(value, float) else value for name, value in quality.summary().items()}


def plot(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  figure, axes = pyplot.subplots(1, 2, figsize=(15, 5), squeeze=False)
  markers = {"ar": "s", "scan": "v", "blockwise": "o", "speculative": "*"}
  for axis, batch_size in zip(axes[0], (1, 16)):
    for index, row in enumerate(r for r in rows if r["batch_size"] == batch_size):
      axis.scatter(row["tokens_per_s"], row["generative_perplexity"], marker=markers[row["kind"]], s=60,
                   label=row["method"], color=pyplot.cm.tab20(index % 20))
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("tokens/s (generated through [EOS], compilation excluded)")
    axis.set_ylabel("generative perplexity under the AR model")
    axis.set_title(f"batch {batch_size}")
  handles, labels = axes[0][0].get_legend_handles_labels()
  figure.legend(handles, labels, fontsize=7, loc="center right")
  figure.tight_layout(rect=(0, 0, 0.76, 1))
  figure.savefig(path, dpi=120)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  methods = [m for m in METHODS if not _METHODS.value or m.key in _METHODS.value]
  families = {m.model for m in methods} | {m.drafter for m in methods if m.drafter} | {"ar"}
  models = {family: ddlm_jax.load(os.path.join(_ROOT.value, f"{family}_embedded")) for family in sorted(families)}
  reference_corpus = corpus.default_corpus()
  peak = common.matmul_peak_gflops()
  rows = []
  if os.path.exists(_OUTPUT.value):
    with open(_OUTPUT.value) as f:
      saved = json.load(f)
    rows = [{"command": saved.get("command"), "matmul_peak_gflops": saved.get("matmul_peak_gflops"), **row}
            for row in saved["rows"] if row["key"] not in {m.key for m in methods}]
  for method in methods:
    quality = None
    for batch_size, num_samples in ((16, _NUM_SAMPLES.value), (1, _BATCH1_SAMPLES.value)):
      speed, tokens_NL = measure(method, models, batch_size, num_samples)
      if quality is None:
        quality = judge(tokens_NL, models[method.model], models["ar"], reference_corpus)
      rows.append(dict(key=method.key, method=method.name, kind=method.kind, batch_size=batch_size, **speed,
                       **quality, command=common.command_line(), matmul_peak_gflops=round(peak, 1)))
      print(rows[-1], flush=True)
  order = {m.key: i for i, m in enumerate(METHODS)}
  rows.sort(key=lambda row: (order[row["key"]], -row["batch_size"]))
  columns = ["method", "batch_size", "tokens_per_s", "calls_per_token", "mean_length", "compile_s",
             "generative_perplexity", "unigram_entropy_bits", "well_formed_fraction", "generator_bits_per_document"]
  common.print_table([{c: row.get(c, "") for c in columns} for row in rows], columns)
  goals = []
  for batch_size, factor in ((1, 2.0), (16, 1.0)):  # the fastest diffusion method, and its quality
    at_batch = [row for row in rows if row["batch_size"] == batch_size]
    ar_row = next(row for row in at_batch if row["kind"] == "ar")
    best = max((row for row in at_batch if row["kind"] in ("scan", "blockwise")), key=lambda row: row["tokens_per_s"])
    name = f"batch {batch_size}, fastest diffusion method ({best['method']})"
    goals.append(common.goal(f"{name}: tokens/s over AR's", best["tokens_per_s"] / ar_row["tokens_per_s"], factor,
                             at_least=True))
    goals.append(common.goal(f"{name}: generative perplexity over AR samples'",
                             best["generative_perplexity"] / ar_row["generative_perplexity"], 1.1, at_least=False))
    goals.append(common.goal(f"{name}: unigram entropy's distance from AR samples' (bits)",
                             abs(best["unigram_entropy_bits"] - ar_row["unigram_entropy_bits"]), 0.1, at_least=False))
  for row in rows:
    if row["kind"] == "speculative" and row["batch_size"] == 1:
      ar_row = next(r for r in rows if r["kind"] == "ar" and r["batch_size"] == 1)
      goals.append(common.goal(f"{row['method']}: mean accepted length", row["mean_accepted_length"], 3.0, True))
      goals.append(common.goal(f"{row['method']}: tokens/s over AR's at batch 1",
                               row["tokens_per_s"] / ar_row["tokens_per_s"], 1.5, True))
  common.print_goals(goals, "")
  payload = dict(device=common.device_description(), rows=rows, goals=goals)
  print(f"wrote {common.write_json_to(_OUTPUT.value, payload)}")
  png = os.path.splitext(_OUTPUT.value)[0] + ".png"
  plot(rows, png)
  print(f"wrote {png}")


if __name__ == "__main__":
  app.run(main)
