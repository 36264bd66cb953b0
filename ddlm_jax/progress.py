"""Progress of long loops (training, sampling, evaluation, classifier training).

  for batch in progress.bar(batches, "eval", "batch"):   # an iterable (its len() as the total, if it has one)
    ...
  bar = progress.bar(num_steps, "train", "step", initial=step)   # or a count, updated by hand
  bar.update(1); bar.set_postfix(loss="1.23"); bar.write("a line"); bar.close()

On a terminal or in a notebook, a tqdm bar; when the output goes to a log file, plain lines (one every
`PlainProgress.every_fraction` of the work or `PlainProgress.every_seconds`, whichever comes first,
and one at the end) instead of one line of carriage returns.
"""
import sys
import time
from typing import Iterable, Iterator, TextIO

import tqdm


class PlainProgress:
  """tqdm's interface (iteration, update, set_postfix, write, close) written as whole lines.
  `total` None: a loop of unknown length, reported by time only."""

  every_fraction = 0.1
  every_seconds = 30.0

  def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, disable: bool = False,
               stream: TextIO | None = None, iterable: Iterable | None = None):
    self.total, self.desc, self.unit, self.n, self.disable = total, desc, unit, initial, disable
    self._stream = stream
    self._iterable = iterable
    self._closed = False
    self._postfix = ""
    self._started = self._last_line = time.perf_counter()
    self._next_line = initial + self._line_every()

  def _line_every(self) -> float:
    return max(1, int(self.total * self.every_fraction)) if self.total else float("inf")

  def _print(self, text: str) -> None:
    if not self.disable:
      print(text, file=self._stream or sys.stdout, flush=True)

  def __iter__(self) -> Iterator:
    for item in self._iterable:
      yield item
      self.update(1)
    self.close()

  def update(self, n: int = 1) -> None:
    self.n += n
    if self.total is not None and self.n >= self.total:
      return  # close() writes the last line
    if self.n >= self._next_line or time.perf_counter() - self._last_line >= self.every_seconds:
      self._line()
      self._next_line = self.n + self._line_every()

  def set_postfix(self, **values) -> None:
    self._postfix = ", ".join(f"{name}={value}" for name, value in values.items())

  def write(self, text: str) -> None:
    self._print(text)

  def _line(self) -> None:
    self._last_line = time.perf_counter()
    seconds = self._last_line - self._started
    postfix = f" ({self._postfix})" if self._postfix else ""
    done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
    plural = self.unit + ("es" if self.unit.endswith(("s", "ch", "sh", "x")) else "s")
    self._print(f"{self.desc}: {done} {plural}, {seconds:.0f} s{postfix}")

  def close(self) -> None:
    if not self._closed and (self.total is None or self.n >= self.total):
      self._line()
    self._closed = True


def _interactive(stream: TextIO) -> bool:
  """A terminal, or a notebook's output (a Jupyter kernel's stream), not a log file."""
  return stream.isatty() or type(stream).__module__.startswith("ipykernel")


def bar(work: int | Iterable, desc: str, unit: str = "it", initial: int = 0,
        disable: bool = False) -> tqdm.tqdm | PlainProgress:
  """A progress bar over `work`, a number of units or an iterable to wrap (iterate over the bar):
  tqdm where someone watches (a terminal, a notebook), whole lines in a log file."""
  iterable = None if isinstance(work, int) else work
  total = work if iterable is None else (len(iterable) if hasattr(iterable, "__len__") else None)
  if _interactive(sys.stderr):
    return tqdm.tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, disable=disable,
                     dynamic_ncols=True)
  return PlainProgress(total, desc, unit, initial=initial, disable=disable, iterable=iterable)
