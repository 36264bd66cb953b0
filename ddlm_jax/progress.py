"""Progress of long loops (training, sampling, evaluation, classifier training).

On a terminal or in a notebook, a tqdm bar; when the output goes to a log file, plain lines (one every
`PlainProgress.every_fraction` of the work and at the end) instead of one line of carriage returns.
"""
import sys
import time
from typing import TextIO

import tqdm


class PlainProgress:
  """tqdm's interface (update, set_postfix, write, close) written as whole lines."""

  every_fraction = 0.1

  def __init__(self, total: int, desc: str, unit: str, initial: int = 0, disable: bool = False,
               stream: TextIO | None = None):
    self.total, self.desc, self.unit, self.n, self.disable = total, desc, unit, initial, disable
    self._stream = stream
    self._postfix = ""
    self._started = time.perf_counter()
    self._next_line = initial + self._line_every()

  def _line_every(self) -> int:
    return max(1, int(self.total * self.every_fraction))

  def _print(self, text: str) -> None:
    if not self.disable:
      print(text, file=self._stream or sys.stdout, flush=True)

  def update(self, n: int = 1) -> None:
    self.n += n
    if self.n >= self._next_line and self.n < self.total:
      self._line()
      self._next_line = self.n + self._line_every()

  def set_postfix(self, **values) -> None:
    self._postfix = ", ".join(f"{name}={value}" for name, value in values.items())

  def write(self, text: str) -> None:
    self._print(text)

  def _line(self) -> None:
    seconds = time.perf_counter() - self._started
    postfix = f" ({self._postfix})" if self._postfix else ""
    self._print(f"{self.desc}: {self.n}/{self.total} {self.unit}s, {seconds:.0f} s{postfix}")

  def close(self) -> None:
    if self.n >= self.total:
      self._line()


def _interactive(stream: TextIO) -> bool:
  return stream.isatty() or "ipykernel" in sys.modules


def bar(total: int, desc: str, unit: str, initial: int = 0, disable: bool = False) -> tqdm.tqdm | PlainProgress:
  """A progress bar over `total` units: tqdm where someone watches, whole lines in a log file."""
  if _interactive(sys.stderr):
    return tqdm.tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)
  return PlainProgress(total, desc, unit, initial=initial, disable=disable)
