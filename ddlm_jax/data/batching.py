"""Token rows from documents, and deterministic, resumable batches of rows or windows.

Two layouts turn tokenized documents into int32[N, L] rows:
  pad:  one document per row, [doc..., EOS, PAD, ...]; longer documents are cut to L-1 tokens.
  pack: every document followed by EOS, concatenated into one stream (`pack_stream`) and cut into
        consecutive rows of L (`cut_rows`; the tail shorter than L is dropped).
A sequence-to-sequence pair is one padded document (`pairs.py`).

`BatchIterator` walks shuffled epochs of the rows; `WindowIterator` draws contiguous windows of a
stream at fresh random offsets for every batch. The whole position of either is a few integers, so
a checkpoint can save it and a restarted run continues with the very same batches.
"""
import itertools
from collections.abc import Sequence

import numpy as np


def _check_seq_len(seq_len: int) -> None:
  if seq_len < 2:
    raise ValueError(f"seq_len must be at least 2 (one token and EOS), got {seq_len}")


def pad_documents(docs: Sequence[Sequence[int]], seq_len: int, *, eos_id: int,
                  pad_id: int) -> np.ndarray:
  """int32[N, L]: each document cut to L-1 tokens, then EOS, then PAD up to L."""
  _check_seq_len(seq_len)
  rows_NL = np.full((len(docs), seq_len), pad_id, np.int32)
  for row_L, doc in zip(rows_NL, docs):
    tokens = doc[:seq_len - 1]
    row_L[:len(tokens)] = tokens
    row_L[len(tokens)] = eos_id
  return rows_NL


def count_truncated(docs: Sequence[Sequence[int]], seq_len: int) -> int:
  """How many documents `pad_documents` cuts short (those longer than L-1 tokens)."""
  _check_seq_len(seq_len)
  return sum(len(doc) > seq_len - 1 for doc in docs)


def pack_stream(docs: Sequence[Sequence[int]], *, eos_id: int) -> np.ndarray:
  """int32[T]: documents each followed by EOS, concatenated."""
  return np.fromiter(itertools.chain.from_iterable(itertools.chain(doc, (eos_id,)) for doc in docs),
                     np.int32)


def cut_rows(stream_T: np.ndarray, seq_len: int) -> np.ndarray:
  """int32[T // L, L]: a view of the stream as consecutive rows of L (the tail shorter than L dropped)."""
  _check_seq_len(seq_len)
  num_rows = len(stream_T) // seq_len
  return stream_T[:num_rows * seq_len].reshape(num_rows, seq_len)


def pack_documents(docs: Sequence[Sequence[int]], seq_len: int, *, eos_id: int) -> np.ndarray:
  """int32[N, L]: documents each followed by EOS, concatenated, cut into full rows of L."""
  return cut_rows(pack_stream(docs, eos_id=eos_id), seq_len)


def _check_batch_size(batch_size: int, process_index: int, process_count: int) -> None:
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"batch_size ({batch_size}) must be positive and divisible by "
                     f"process_count ({process_count})")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")


class BatchIterator:
  """Endless batches of rows in shuffled epochs, identical on every run with the same seed.

  Epoch e visits the rows in a permutation drawn from (seed, e), in steps of `batch_size` rows;
  the incomplete last batch of an epoch is dropped. With several processes, each returns its own
  contiguous slice of every global batch, so together they see the whole batch once.

  Attributes:
    batch_size: global batch size, divisible by `process_count`.
    local_batch_size: rows this process returns per batch.
    steps_per_epoch: batches in one epoch.
  """

  def __init__(self, rows_NL: np.ndarray, batch_size: int, seed: int, *,
               process_index: int = 0, process_count: int = 1):
    rows_NL = np.asarray(rows_NL)
    if rows_NL.ndim != 2:
      raise ValueError(f"rows must be a 2-D [N, L] array, got shape {rows_NL.shape}")
    _check_batch_size(batch_size, process_index, process_count)
    if batch_size > len(rows_NL):
      raise ValueError(f"batch_size ({batch_size}) is larger than the number of rows "
                       f"({len(rows_NL)}); use more data or a smaller batch")
    self._rows_NL = rows_NL
    self._seed = seed
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count
    self._local_start = process_index * self.local_batch_size
    self.steps_per_epoch = len(rows_NL) // batch_size
    self._epoch = 0
    self._position = 0
    self._order = self._epoch_order(0)

  def _epoch_order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self._seed, epoch]).permutation(len(self._rows_NL))

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> np.ndarray:
    """int32[B_local, L]: this process's slice of the next global batch."""
    start = self._position * self.batch_size + self._local_start
    batch_BL = self._rows_NL[self._order[start:start + self.local_batch_size]]
    self._position += 1
    if self._position == self.steps_per_epoch:
      self.set_state({"epoch": self._epoch + 1, "position": 0})
    return batch_BL

  def get_state(self) -> dict[str, int]:
    """The position of the next batch: {'epoch': e, 'position': batches already taken in e}."""
    return {"epoch": self._epoch, "position": self._position}

  def set_state(self, state: dict[str, int]) -> None:
    """Continues from a state returned by `get_state`."""
    epoch, position = int(state["epoch"]), int(state["position"])
    if epoch < 0 or not 0 <= position < self.steps_per_epoch:
      raise ValueError(f"invalid iterator state {state}: epoch must be >= 0 and position in "
                       f"[0, {self.steps_per_epoch})")
    if epoch != self._epoch:
      self._order = self._epoch_order(epoch)
    self._epoch, self._position = epoch, position


class WindowIterator:
  """Endless batches of contiguous windows of a token stream, identical on every run with the seed.

  Batch n draws `batch_size` offsets uniformly from [0, T - L] with a generator seeded by
  (seed, n); its rows are the windows stream[offset:offset + L]. With several processes, each
  returns its own contiguous slice of every global batch, so together they see the whole batch once.

  Attributes:
    batch_size: global batch size, divisible by `process_count`.
    local_batch_size: rows this process returns per batch.
  """

  def __init__(self, stream_T: np.ndarray, seq_len: int, batch_size: int, seed: int, *,
               process_index: int = 0, process_count: int = 1):
    stream_T = np.asarray(stream_T)
    if stream_T.ndim != 1:
      raise ValueError(f"the stream must be a 1-D [T] array, got shape {stream_T.shape}")
    _check_seq_len(seq_len)
    _check_batch_size(batch_size, process_index, process_count)
    if len(stream_T) < seq_len:
      raise ValueError(f"the stream has {len(stream_T)} tokens, fewer than one window of "
                       f"seq_len={seq_len}; use more data or shorter windows")
    self._stream_T = stream_T
    self._seq_len = seq_len
    self._seed = seed
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count
    self._local_start = process_index * self.local_batch_size
    self._batch = 0

  def __iter__(self) -> "WindowIterator":
    return self

  def __next__(self) -> np.ndarray:
    """int32[B_local, L]: this process's slice of the next global batch of windows."""
    num_offsets = len(self._stream_T) - self._seq_len + 1
    offsets_B = np.random.default_rng([self._seed, self._batch]).integers(num_offsets, size=self.batch_size)
    local_B = offsets_B[self._local_start:self._local_start + self.local_batch_size]
    self._batch += 1
    return self._stream_T[local_B[:, None] + np.arange(self._seq_len)]

  def get_state(self) -> dict[str, int]:
    """The position of the next batch: {'batch': batches already taken}."""
    return {"batch": self._batch}

  def set_state(self, state: dict[str, int]) -> None:
    """Continues from a state returned by `get_state`."""
    if set(state) != {"batch"} or int(state["batch"]) < 0:
      raise ValueError(f"invalid window iterator state {state}: expected {{'batch': n}} with n >= 0")
    self._batch = int(state["batch"])
