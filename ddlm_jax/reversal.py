"""Forward and reversal completion: LLaDA's poem test (Nie et al. 2025, Table 4), on documents we generate.

Each document is cut at its middle word into (before, after) (`pairs.split_in_halves`). Forward
gives `before` and asks for `after`; reversal gives `after` and asks for `before`. The documents
are ones the models saw many times in pretraining (memorised, as LLaDA's poems), so a miss is a
failure to recall in that direction, not missing knowledge. Two formats:

  'zero_shot'   a language model, asked through its canvas. Forward: the prompt `before` at the start
                of the canvas, the rest generated (the autoregressive and block models decode left
                to right, up to their [EOS]). Reversal, diffusion models only: the tokens of `after`
                fixed from position len(before's tokens) on and everything else generated, so the
                model is told how long the missing half is (a left-to-right model cannot condition
                on text after the tokens it writes, and gets no reversal row).
  'instruction' a model fine-tuned on task 'completion' (`datasets.INSTRUCTIONS`: "Write what
                follows: " + before, or "Write what comes before: " + after), asked with the same
                instruction, answering after the prompt's [EOS] (`Pipeline.translate`), for the
                documents that fine-tuning never showed in the instruction format.

Measures, per direction: exact match (zero_shot: the completed canvas reads the document, then
ends or goes on with more text, as no diffusion model is told where its canvas's document ends;
instruction: the answer is exactly the missing half) and, for 'instruction', the conditional bits
per token of the missing half and its [EOS] given the prompt (`Pipeline.score`): exact for the
autoregressive model, an upper bound for diffusion models. Decoding is greedy: temperature 0, the
diffusion models revealing one token per step, most confident first ('low_confidence').
"""
import dataclasses
from collections.abc import Sequence

import numpy as np

from ddlm_jax import pipeline as pipeline_lib
from ddlm_jax.data import datasets
from ddlm_jax.data import pairs

DIRECTIONS = ("forward", "reversal")
FORMATS = ("zero_shot", "instruction")


@dataclasses.dataclass(frozen=True)
class Completions:
  """One model's completions in one direction and format.

  Attributes:
    direction: 'forward' or 'reversal'.
    format: 'zero_shot' or 'instruction'.
    outputs: what the model wrote, one per document (zero_shot: the whole decoded canvas).
    expected: what an exact answer reads, one per document.
    bits_per_token: conditional bits per token of the missing half given the prompt, or None.
    bits_stderr: its standard error over documents (Monte Carlo included), or None.
  """
  direction: str
  format: str
  outputs: tuple[str, ...]
  expected: tuple[str, ...]
  bits_per_token: float | None = None
  bits_stderr: float | None = None

  @property
  def exact_match(self) -> float:
    """Share of documents answered exactly (whitespace runs compared as one space; zero_shot: the
    output reads the document, then ends or goes on after a space)."""
    def exact(output: str, expected: str) -> bool:
      output, expected = " ".join(output.split()), " ".join(expected.split())
      return output == expected or self.format == "zero_shot" and output.startswith(expected + " ")
    return float(np.mean([exact(output, expected) for output, expected in zip(self.outputs, self.expected)]))

  def summary(self) -> dict:
    return {"direction": self.direction, "format": self.format, "exact_match": round(self.exact_match, 4),
            "num_documents": len(self.outputs), "bits_per_token": self.bits_per_token,
            "bits_stderr": self.bits_stderr}


def greedy_settings(model: pipeline_lib.Pipeline) -> dict:
  """Greedy decoding for `model`: the argmax, and for diffusion one most-confident token per step."""
  if model.process.causal_network:
    return {"temperature": 0.0}
  return {"temperature": 0.0, "strategy": "low_confidence", "steps": model.seq_len}


def writes_left_to_right(model: pipeline_lib.Pipeline) -> bool:
  """True for the autoregressive and block models: what they write cannot depend on text after it."""
  return model.process.causal_network or model.config.process.name == "block"


def zero_shot(model: pipeline_lib.Pipeline, documents: Sequence[str], direction: str,
              seed: int = 0) -> Completions:
  """Completes each document's missing half through a language model's canvas (see the module)."""
  if direction not in DIRECTIONS:
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
  if model.config.data.task != "lm":
    raise ValueError("zero_shot asks a language model through its canvas; this model was trained on task "
                     f"{model.config.data.task!r}: use instruction()")
  halves = [pairs.split_in_halves(document) for document in documents]
  if direction == "forward":
    outputs = model.generate([before for before, _ in halves], seed=seed, **greedy_settings(model))
  else:
    if writes_left_to_right(model):
      raise ValueError("a left-to-right model cannot condition on the text after the tokens it writes: "
                       "reversal needs a diffusion model over the whole canvas, or the 'instruction' format")
    constraints = [{len(model.tokenizer.encode(before)): after} for before, after in halves]
    outputs = model.generate(constraints=constraints, seed=seed, **greedy_settings(model))
  return Completions(direction, "zero_shot", tuple(outputs), tuple(documents))


def instruction(model: pipeline_lib.Pipeline, documents: Sequence[str], direction: str, seed: int = 0,
                num_samples: int = 16) -> Completions:
  """Asks a model fine-tuned on task 'completion' for each document's missing half (see the module)."""
  if direction not in DIRECTIONS:
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
  if model.config.data.task != "completion":
    raise ValueError("the instruction format needs a model fine-tuned on task 'completion' "
                     f"(experiments/reversal.py:MODEL,sft); this one was trained on {model.config.data.task!r}")
  halves = [pairs.split_in_halves(document) for document in documents]
  given, missing = zip(*halves) if direction == "forward" else zip(*[(after, before) for before, after in halves])
  prompts = [datasets.INSTRUCTIONS[direction] + text for text in given]
  outputs = model.translate(prompts, seed=seed, **greedy_settings(model))
  score = model.score(list(missing), sources=prompts, eos=True, num_samples=num_samples, seed=seed)
  return Completions(direction, "instruction", tuple(outputs), tuple(missing),
                     round(score.bits_per_token, 4), round(score.stderr_over_sequences, 4))
