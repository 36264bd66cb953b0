"""Sequence-to-sequence pairs in one row: [source..., EOS, target..., EOS, PAD, ...].

A model trained on a pair task (DiffuSeq-style) reads the source with its closing [EOS] (the
`source_mask`) clean, and generates and scores the target alone. Classifier-free guidance drops
the condition, the source without its [EOS] (`condition_mask`), to [PAD], so the layout of the row
is kept. Masks take numpy arrays, and jax arrays inside or outside `jax.jit`, and return the same
kind.
"""
from collections.abc import Sequence

import jax

from ddlm_jax import guidance
from ddlm_jax.data import tokenizers


def encode_pair(source_ids: Sequence[int], target_ids: Sequence[int], eos_id: int) -> list[int]:
  """The document of a pair, source + [EOS] + target; `batching.pad_documents` makes it a row
  (the target's [EOS], then [PAD])."""
  return [*source_ids, eos_id, *target_ids]


def split_in_halves(text: str) -> tuple[str, str]:
  """(before, after): `text` cut at the space nearest its middle character, which neither half keeps.

  A text without a space between two words cannot be cut and is refused.
  """
  spaces = [i for i, char in enumerate(text) if char == " " and 0 < i < len(text) - 1]
  if not spaces:
    raise ValueError(f"cannot cut {text!r} in two: it has no space between words")
  cut = min(spaces, key=lambda i: abs(2 * i + 1 - len(text)))
  return text[:cut], text[cut + 1:]


def source_mask(rows_BL, eos_id: int):
  """bool[B, L]: True up to and including each row's first [EOS], the source of a pair's row.

  A row without [EOS] is all source.
  """
  is_eos_BL = rows_BL == eos_id
  return is_eos_BL.cumsum(axis=-1) - is_eos_BL == 0  # No [EOS] strictly before the position.


def condition_mask(rows_BL, eos_id: int):
  """bool[B, L]: the source without its [EOS], what classifier-free guidance drops."""
  return source_mask(rows_BL, eos_id) & (rows_BL != eos_id)


def source_and_rows(rows_BL: jax.Array, pairs: bool, condition_dropout: float = 0.0,
                    key: jax.Array | None = None) -> tuple[jax.Array | None, jax.Array]:
  """(prompt mask bool[B, L], rows int32[B, L]) of a batch: a pair's source is conditioned on and
  not scored; with `condition_dropout`, that share of the rows has its condition replaced by [PAD]
  (the null condition of classifier-free guidance). (None, rows) for language modelling."""
  if not pairs:
    return None, rows_BL
  source_BL = source_mask(rows_BL, tokenizers.EOS_ID)
  if condition_dropout:
    drop_B = jax.random.bernoulli(key, condition_dropout, rows_BL.shape[:1])
    condition_BL = condition_mask(rows_BL, tokenizers.EOS_ID) & drop_B[:, None]
    rows_BL = guidance.drop_condition(rows_BL, condition_BL, tokenizers.PAD_ID)
  return source_BL, rows_BL
