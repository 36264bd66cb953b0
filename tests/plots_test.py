"""ddlm_jax.plots: the numbers each picture draws are the numbers it was given."""
import os
import string

import matplotlib
import numpy as np
import pytest
import tensorboardX

from ddlm_jax import evaluate
from ddlm_jax import plots
from ddlm_jax.data import tokenizers

matplotlib.use("Agg")

TOKENIZER = tokenizers.CharTokenizer(string.ascii_lowercase + " ")
MASK = TOKENIZER.mask_id


def masked_trajectory() -> tuple[np.ndarray, np.ndarray]:
  """(trajectory int32[S=4, N=2, L=5] of a canvas revealed at known steps, those steps int[N, L])."""
  final_NL = np.array([TOKENIZER.encode("abcde"), TOKENIZER.encode("vwxyz")], np.int32)
  revealed_at_NL = np.array([[0, 3, 1, 2, 3], [2, 0, 0, 1, 3]])
  trajectory_SNL = np.where(np.arange(4)[:, None, None] >= revealed_at_NL, final_NL, MASK).astype(np.int32)
  return trajectory_SNL, revealed_at_NL


def test_settle_steps_are_the_reveal_steps_of_a_masked_trajectory():
  trajectory_SNL, revealed_at_NL = masked_trajectory()
  np.testing.assert_array_equal(plots.settle_steps(trajectory_SNL), revealed_at_NL)


def test_settle_steps_of_a_changing_token_is_its_last_change():
  trajectory_SNL = np.array([[[3, 1]], [[4, 1]], [[3, 1]], [[3, 1]]])  # position 0 settles at step 2
  np.testing.assert_array_equal(plots.settle_steps(trajectory_SNL), [[2, 0]])
  with pytest.raises(ValueError, match="steps, N, L"):
    plots.settle_steps(np.zeros((2, 3)))


def test_denoising_image_and_snapshots_show_the_trajectory():
  trajectory_SNL, revealed_at_NL = masked_trajectory()
  figure = plots.denoising(trajectory_SNL, TOKENIZER, row=1, num_snapshots=2)
  image = figure.axes[0].images[0]
  np.testing.assert_array_equal(image.get_array(), revealed_at_NL + 1)  # steps counted from 1
  assert image.get_clim() == (1, 4)
  text = figure.axes[1].texts[0].get_text()  # axes: image, text, the image's colour bar
  assert text.splitlines() == ["after step 1:", "  _wx__", "after step 4:", "  vwxyz"]
  figure.savefig(os.devnull, format="png")
  with pytest.raises(ValueError, match="row 2"):
    plots.denoising(trajectory_SNL, TOKENIZER, row=2)


def test_training_curves_draw_the_scalars_written(tmp_path):
  writer = tensorboardX.SummaryWriter(str(tmp_path / "tensorboard"))
  losses = {10: 5.0, 20: 4.25, 30: 3.5}
  for step, loss in losses.items():
    writer.add_scalar("train/loss", loss, step)
    writer.add_scalar("train/tokens_per_second", 1000.0, step)
  writer.add_scalar("eval/bits_per_token", 2.5, 30)
  writer.add_scalar("eval/bits_per_token_stderr", 0.1, 30)
  writer.add_scalar("eval/generator_bits_per_token", 1.75, 30)
  writer.close()
  # A resumed run repeats step 30 (its own file: the suffix keeps a run started in the same second apart).
  writer = tensorboardX.SummaryWriter(str(tmp_path / "tensorboard"), filename_suffix=".resumed")
  writer.add_scalar("train/loss", 3.25, 30)
  writer.close()
  scalars = plots.read_scalars(str(tmp_path))
  steps, values = scalars["train/loss"]
  np.testing.assert_array_equal(steps, [10, 20, 30])
  np.testing.assert_allclose(values, [5.0, 4.25, 3.25])
  figure = plots.training_curves(str(tmp_path))
  assert [axis.get_title() for axis in figure.axes if axis.get_visible()] == ["train/loss", "eval/bits_per_token"]
  np.testing.assert_allclose(figure.axes[0].lines[0].get_xydata(), [[10, 5.0], [20, 4.25], [30, 3.25]])
  held_out, generator = figure.axes[1].lines
  np.testing.assert_allclose(held_out.get_xydata(), [[30, 2.5]])
  np.testing.assert_allclose(generator.get_xydata(), [[30, 1.75]])
  with pytest.raises(ValueError, match="train/lr"):
    plots.training_curves(str(tmp_path), tags=["train/lr"])
  with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
    plots.read_scalars(str(tmp_path / "elsewhere"))


def test_read_scalars_stops_at_a_record_cut_short(tmp_path):
  writer = tensorboardX.SummaryWriter(str(tmp_path))
  for step in range(5):
    writer.add_scalar("train/loss", float(step), step)
  writer.close()
  (path,) = tmp_path.glob("*tfevents*")
  path.write_bytes(path.read_bytes()[:-7])  # the last record's payload and checksum cut
  steps, _ = plots.read_scalars(str(tmp_path))["train/loss"]
  np.testing.assert_array_equal(steps, [0, 1, 2, 3])


def summary(bits_per_token, stderr, reference=1.75):
  return {"bits_per_token": bits_per_token, "bits_per_token_stderr": stderr, "num_tokens": 300,
          "num_sequences": 10, "bits_per_document": bits_per_token * 30, "generator_bits_per_token": reference,
          "generator_bits_per_document": reference * 30}


def test_likelihood_bars_errors_and_generator_line():
  result = evaluate.ElboResult(bits_per_token=3.0, stderr=0.1, num_sequences=2, num_samples=2,
                               bits_per_sequence=np.array([80.0, 100.0]), tokens_per_sequence=np.array([30, 30]),
                               reference_bits_per_token=1.75, reference_bits_per_document=52.5)
  figure = plots.likelihood({"MDLM": result, "AR": summary(2.0, 0.0)})
  axis = figure.axes[0]
  assert [patch.get_height() for patch in axis.patches] == [3.0, 2.0]
  error_segments = axis.collections[0].get_segments()
  np.testing.assert_allclose([segment[:, 1] for segment in error_segments], [[2.9, 3.1], [2.0, 2.0]])
  assert axis.lines[-1].get_ydata()[0] == 1.75
  assert [label.get_text() for label in axis.get_xticklabels()] == ["MDLM", "AR"]

  figure = plots.likelihood({"AR": summary(2.0, 0.1)}, per="document", entropy_bits_per_document=58.92)
  axis = figure.axes[0]
  assert axis.patches[0].get_height() == 60.0
  np.testing.assert_allclose(axis.collections[0].get_segments()[0][:, 1], [60 - 3.0, 60 + 3.0])
  assert [line.get_ydata()[0] for line in axis.lines[-2:]] == [52.5, 58.92]
  with pytest.raises(ValueError, match="not on one scale"):
    plots.likelihood({"a": summary(2.0, 0.1), "b": summary(2.0, 0.1, reference=1.5)})
  with pytest.raises(ValueError, match="per='document'"):
    plots.likelihood({"a": summary(2.0, 0.1)}, entropy_bits_per_document=58.92)


def test_quality_vs_steps_draws_each_model_and_skips_missing_measures():
  quality = lambda perplexity, entropy: evaluate.SampleQuality(num_samples=4, unigram_entropy_bits=entropy,
                                                               generative_perplexity=perplexity)
  figure = plots.quality_vs_steps({"MDLM": {16: quality(900.0, 6.5), 4: quality(3000.0, 6.9)},
                                   "UDLM": {4: quality(5000.0, 7.0)}}, reference=quality(4.0, 6.8))
  assert [axis.get_title() for axis in figure.axes] == ["generative perplexity (AR judge)", "unigram entropy (bits)"]
  perplexity_axis = figure.axes[0]
  np.testing.assert_allclose(perplexity_axis.lines[0].get_xydata(), [[4, 3000.0], [16, 900.0]])
  np.testing.assert_allclose(perplexity_axis.lines[1].get_xydata(), [[4, 5000.0]])
  assert perplexity_axis.lines[2].get_ydata()[0] == 4.0 and perplexity_axis.get_yscale() == "log"
  assert [text.get_text() for text in perplexity_axis.get_legend().get_texts()] == ["MDLM", "UDLM", "reference"]
  labelled = plots.quality_vs_steps({"MDLM": {4: quality(3000.0, 6.9)}}, reference=quality(4.0, 6.8),
                                    reference_label="AR")
  assert [text.get_text() for text in labelled.axes[0].get_legend().get_texts()] == ["MDLM", "AR"]


def test_speed_quality_places_each_method():
  figure = plots.speed_quality({"AR": (3000.0, 3.8), "MDLM dual cache": (1500.0, 600.0)})
  axis = figure.axes[0]
  np.testing.assert_allclose([c.get_offsets()[0] for c in axis.collections], [[3000.0, 3.8], [1500.0, 600.0]])
  assert [text.get_text() for text in axis.get_legend().get_texts()] == ["AR", "MDLM dual cache"]
