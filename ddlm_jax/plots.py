"""Pictures of what the models do (matplotlib, the `plots` extra: pip install 'ddlm_jax[plots]').

  texts, trajectory_SNL = model.generate(num_samples=4, record_trajectory=True)
  plots.denoising(trajectory_SNL, model.tokenizer)            # which position is revealed when
  plots.training_curves(workdir)                              # the TensorBoard scalars of a run
  plots.likelihood({"MDLM": summary, "AR": other_summary})    # bits/token ± s.e. beside the generator
  plots.quality_vs_steps({"MDLM": {16: quality, 64: ...}})    # evaluate.SampleQuality per step count
  plots.speed_quality({"AR": (tokens_per_s, perplexity)})     # fast decoding's chart

Every function returns a `matplotlib.figure.Figure` built without pyplot (no global state): a
notebook shows it as a cell's value, `figure.savefig(path)` writes it. The numbers drawn are the
artists' data (`figure.axes[i].lines`, `.images`, `.patches`), which the tests read back.
"""
import glob
import os
import struct
import textwrap
from typing import Any, Mapping, Sequence

import numpy as np
from tensorboardX import record_writer
from tensorboardX.proto import event_pb2


def _figure(width: float, height: float):
  """An empty Figure on the Agg canvas; a clear error without matplotlib."""
  try:
    from matplotlib import figure  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError("ddlm_jax.plots needs matplotlib: pip install 'ddlm_jax[plots]' "
                      "(or pip install matplotlib)") from error
  return figure.Figure(figsize=(width, height), layout="constrained")


# Denoising trajectories.

def settle_steps(trajectory_SNL: np.ndarray) -> np.ndarray:
  """int32[N, L]: for each position, the first step from which it holds its final token (the
  trajectory's canvas after every step, int32[S, N, L], as `Pipeline.generate(record_trajectory=True)`
  returns it). For the absorbing families this is the step that revealed the position (0 for a
  prompt, fixed from the start); for the uniform and Gaussian ones the step of its last change."""
  trajectory_SNL = np.asarray(trajectory_SNL)
  if trajectory_SNL.ndim != 3 or not trajectory_SNL.shape[0]:
    raise ValueError(f"a trajectory is int[steps, N, L] with steps >= 1, got shape {trajectory_SNL.shape}")
  differs_SNL = trajectory_SNL != trajectory_SNL[-1]
  changed_at_SNL = np.where(differs_SNL, np.arange(len(trajectory_SNL))[:, None, None], -1)
  return (changed_at_SNL.max(0) + 1).astype(np.int32)


def snapshot_steps(num_steps: int, count: int) -> list[int]:
  """`count` steps spread from the first to the last of `num_steps` (fewer when there are fewer)."""
  return sorted({int(s) for s in np.round(np.linspace(0, num_steps - 1, count))})


def denoising(trajectory_SNL: np.ndarray, tokenizer=None, *, row: int = 0, num_snapshots: int = 4,
              line_width: int = 100, mask_symbol: str = "_"):
  """The canvas filling in: an image of the step at which each position took its final token
  (`settle_steps` + 1, rows x positions; 1 for a position fixed from the start), and, with a
  tokenizer, the text of `row` after `num_snapshots` steps, each [MASK] written as `mask_symbol`."""
  steps_NL = settle_steps(trajectory_SNL) + 1
  num_steps, num_rows, _ = np.shape(trajectory_SNL)
  if not 0 <= row < num_rows:
    raise ValueError(f"row {row} is not one of the trajectory's {num_rows} rows")
  snapshots = []
  for step in snapshot_steps(num_steps, num_snapshots) if tokenizer is not None else []:
    text = tokenizer.decode(np.asarray(trajectory_SNL)[step, row].tolist(), show_mask=True)
    lines = textwrap.wrap(text.replace(tokenizer.mask_text, mask_symbol).replace("\n", " "), line_width,
                          drop_whitespace=False) or [""]
    snapshots.append(f"after step {step + 1}:\n" + "\n".join(f"  {line}" for line in lines))
  text_lines = sum(snapshot.count("\n") + 1 for snapshot in snapshots)
  image_height, text_height = 0.9 + 0.22 * num_rows, 0.16 * text_lines
  figure = _figure(10, image_height + text_height + 0.3)
  axes = figure.subplots(1 + bool(snapshots), 1, squeeze=False,
                         height_ratios=[image_height] + [text_height] * bool(snapshots))[:, 0]
  image = axes[0].imshow(steps_NL, aspect="auto", cmap="viridis", vmin=1, vmax=num_steps, interpolation="nearest")
  figure.colorbar(image, ax=axes[0], label="step")
  axes[0].set_xlabel("position")
  axes[0].set_ylabel("sample")
  axes[0].set_title(f"the step at which each position took its final token ({num_steps} steps)")
  if snapshots:
    axes[1].axis("off")
    axes[1].text(0, 1, "\n".join(snapshots), family="monospace", fontsize=8, va="top",
                 transform=axes[1].transAxes)
    axes[1].set_title(f"sample {row} ({mask_symbol} = [MASK])", loc="left", fontsize=9)
  return figure


# Training curves from TensorBoard event files.

def _records(path: str):
  """The payloads of one TFRecord file; stops at a record cut short (a run killed mid-write) or
  whose length fails its checksum, as TensorBoard does."""
  with open(path, "rb") as file:
    while True:
      header = file.read(12)
      if len(header) < 12:
        return
      length_bytes, (length_crc,) = header[:8], struct.unpack("<I", header[8:])
      if record_writer.masked_crc32c(length_bytes) != length_crc:
        return
      (length,) = struct.unpack("<Q", length_bytes)
      payload = file.read(length + 4)
      if len(payload) < length + 4:
        return
      yield payload[:length]


def read_scalars(logdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{tag: (steps int64[K], values float64[K])} of every scalar in the event files under `logdir`
  (a run's workdir or its `tensorboard/` folder), sorted by step. A step written twice (a resumed
  run that repeated steps after its last checkpoint) keeps the value written last."""
  paths = sorted(glob.glob(os.path.join(logdir, "**", "*tfevents*"), recursive=True))
  if not paths:
    raise FileNotFoundError(f"no TensorBoard event files under {logdir}; training writes them to WORKDIR/tensorboard")
  points = {}  # tag -> {step: (wall time, value)}
  for path in paths:
    for payload in _records(path):
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        if value.WhichOneof("value") == "simple_value":
          number = value.simple_value
        elif value.HasField("tensor") and value.tensor.float_val:
          number = value.tensor.float_val[0]
        else:
          continue
        by_step = points.setdefault(value.tag, {})
        if event.step not in by_step or by_step[event.step][0] <= event.wall_time:
          by_step[event.step] = (event.wall_time, number)
  return {tag: (np.array(sorted(by_step), np.int64), np.array([by_step[s][1] for s in sorted(by_step)], np.float64))
          for tag, by_step in sorted(points.items())}


def training_curves(logdir: str, tags: Sequence[str] | None = None):
  """One panel per scalar tag, value against step, from the run's TensorBoard events
  (`read_scalars`). By default the loss, every other `train/` tag but tokens/s, then the held-out
  `eval/bits_per_token`, drawn with the generator's exact NLL of the same documents (dashed)
  where the run logged it."""
  scalars = read_scalars(logdir)
  if tags is None:
    tags = sorted((tag for tag in scalars if tag.startswith("train/") and tag != "train/tokens_per_second"),
                  key=lambda tag: tag != "train/loss")  # the loss first, the rest in name order
    tags += [tag for tag in ("eval/bits_per_token",) if tag in scalars]
  missing = [tag for tag in tags if tag not in scalars]
  if missing or not tags:
    raise ValueError(f"tags {missing or list(tags)} are not in the events under {logdir}; they hold {list(scalars)}")
  columns = min(len(tags), 4)
  figure = _figure(3.5 * columns, 3 * -(-len(tags) // columns))
  axes = figure.subplots(-(-len(tags) // columns), columns, squeeze=False).ravel()
  for axis, tag in zip(axes, tags):
    steps, values = scalars[tag]
    axis.plot(steps, values, marker="." if len(steps) < 30 else None)
    if tag == "eval/bits_per_token" and "eval/generator_bits_per_token" in scalars:
      axis.plot(*scalars["eval/generator_bits_per_token"], color="black", linestyle="--",
                label="generator's exact NLL")
      axis.legend(fontsize=8)
    axis.set_title(tag)
    axis.set_xlabel("step")
  for axis in axes[len(tags):]:
    axis.set_visible(False)
  return figure


# Likelihood and sample quality.

def _summary(result: Any) -> Mapping[str, Any]:
  """The summary dict of an `evaluate.ElboResult` or `evaluate.SampleQuality`, or a summary dict itself
  (train_and_evaluate returns one)."""
  return result.summary() if hasattr(result, "summary") else result


def likelihood(results: Mapping[str, Any], *, per: str = "token", entropy_bits_per_document: float | None = None):
  """Bars of each model's held-out bits (NELBO, or exact NLL for AR) ± its Monte Carlo standard
  error, per text token or per document, beside the data generator's exact NLL of the same
  documents (a dashed line; a bound must lie above it) when the results know it.

  Args:
    results: {name: `evaluate.ElboResult` or its summary dict (what `train_and_evaluate` returns)}.
    per: 'token' or 'document'. Bits per token compare models only under one tokenizer.
    entropy_bits_per_document: per='document': also a dotted line at the generator's entropy
      (`corpus.default_corpus().entropy_bits()` for the embedded corpus).
  """
  if per not in ("token", "document"):
    raise ValueError(f"per must be 'token' or 'document', got {per!r}")
  if not results:
    raise ValueError("no results to chart")
  summaries = {name: _summary(result) for name, result in results.items()}
  heights, errors = [], []
  for name, summary in summaries.items():
    if per == "token":
      heights.append(summary["bits_per_token"])
      errors.append(summary["bits_per_token_stderr"])
    else:
      if "bits_per_document" not in summary:
        raise ValueError(f"{name!r} has no bits per document (only results on the embedded corpus do); use per='token'")
      heights.append(summary["bits_per_document"])
      errors.append(summary["bits_per_token_stderr"] * summary["num_tokens"] / summary["num_sequences"])
  reference_key = "generator_bits_per_token" if per == "token" else "generator_bits_per_document"
  references = {name: summary[reference_key] for name, summary in summaries.items() if reference_key in summary}
  if len(set(np.round(list(references.values()), 6))) > 1:
    raise ValueError(f"the generator's NLL differs between results ({references}): they scored different "
                     "documents or tokenizers, so their bits are not on one scale")
  figure = _figure(max(4.5, 1.2 + 1.1 * len(summaries)), 4.5)
  axis = figure.subplots()
  positions = np.arange(len(summaries))
  axis.bar(positions, heights, yerr=errors, capsize=4, color="tab:blue", label="held-out bits ± s.e.")
  axis.set_xticks(positions, list(summaries), rotation=30, ha="right")
  if references:
    axis.axhline(next(iter(references.values())), color="black", linestyle="--",
                 label="generator's exact NLL of the same documents")
  if entropy_bits_per_document is not None:
    if per != "document":
      raise ValueError("the generator's entropy is in bits per document: chart per='document' to draw it")
    axis.axhline(entropy_bits_per_document, color="grey", linestyle=":", label="generator's entropy")
  axis.set_ylabel(f"bits per {per}")
  figure.legend(fontsize=8, loc="outside lower center")
  return figure


QUALITY_PANELS = (("generative_perplexity", "generative perplexity (AR judge)"),
                  ("unigram_entropy_bits", "unigram entropy (bits)"),
                  ("well_formed_fraction", "share parsed by the generator"))


def quality_vs_steps(points: Mapping[str, Mapping[int, Any]], *, reference: Any = None,
                     reference_label: str = "reference"):
  """Sample quality against sampling steps: one panel per measure of `evaluate.SampleQuality` that
  any point has (generative perplexity on a log scale), one line per model.

  Args:
    points: {model name: {steps: SampleQuality or its summary dict}}.
    reference: a SampleQuality or its summary dict (e.g. the AR model's own samples), drawn as a
      dashed line labelled `reference_label`.
  """
  summaries = {name: {steps: _summary(quality) for steps, quality in sorted(by_steps.items())}
               for name, by_steps in points.items()}
  reference = None if reference is None else _summary(reference)
  panels = [(key, label) for key, label in QUALITY_PANELS
            if any(by_steps[s].get(key) is not None for by_steps in summaries.values() for s in by_steps)]
  if not panels:
    raise ValueError("no sample quality to chart")
  figure = _figure(4 * len(panels), 3.4)
  for axis, (key, label) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
    for name, by_steps in summaries.items():
      steps = [s for s in by_steps if by_steps[s].get(key) is not None]
      axis.plot(steps, [by_steps[s][key] for s in steps], marker="o", label=name)
    if reference is not None and reference.get(key) is not None:
      axis.axhline(reference[key], color="black", linestyle="--", label=reference_label)
    axis.set_xscale("log", base=2)
    if key == "generative_perplexity":
      axis.set_yscale("log")
    axis.set_xlabel("sampling steps")
    axis.set_title(label)
  figure.axes[0].legend(fontsize=8)
  return figure


def speed_quality(points: Mapping[str, tuple[float, float]]):
  """Fast decoding's chart: one marker per method at (tokens/s, generative perplexity), both on
  log scales; faster is right, better is down."""
  if not points:
    raise ValueError("no methods to chart")
  figure = _figure(7.5, 4.5)
  axis = figure.subplots()
  for name, (tokens_per_second, perplexity) in points.items():
    axis.scatter([tokens_per_second], [perplexity], s=50, label=name)
  axis.set_xscale("log")
  axis.set_yscale("log")
  axis.set_xlabel("tokens/s (compilation excluded)")
  axis.set_ylabel("generative perplexity (AR judge)")
  axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  return figure
