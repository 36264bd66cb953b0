"""Progress output: whole lines, not carriage returns, when nobody watches a terminal."""
import io
import types

from ddlm_jax import progress


def test_plain_progress_writes_a_line_every_tenth_and_at_the_end():
  stream = io.StringIO()
  bar = progress.PlainProgress(total=100, desc="train", unit="step", stream=stream)
  for _ in range(100):
    bar.update(1)
  bar.set_postfix(loss="1.234")
  bar.close()
  lines = stream.getvalue().splitlines()
  assert "\r" not in stream.getvalue()
  assert [line.split(":")[1].split()[0] for line in lines] == [f"{n}/100" for n in range(10, 101, 10)]
  assert lines[-1].endswith("(loss=1.234)")


def test_plain_progress_resumed_counts_from_its_initial_step_and_can_be_silenced():
  stream = io.StringIO()
  bar = progress.PlainProgress(total=100, desc="train", unit="step", initial=95, stream=stream)
  bar.update(5)
  bar.close()
  assert stream.getvalue().splitlines() == [stream.getvalue().splitlines()[0]]
  assert "100/100" in stream.getvalue()
  silent = io.StringIO()
  quiet = progress.PlainProgress(total=10, desc="eval", unit="batch", disable=True, stream=silent)
  quiet.update(10)
  quiet.close()
  assert silent.getvalue() == ""


def test_bar_is_plain_when_stderr_is_a_file(monkeypatch):
  monkeypatch.setattr("sys.stderr", io.StringIO())
  assert isinstance(progress.bar(10, "eval", "batch"), progress.PlainProgress)


def test_plain_progress_wraps_an_iterable_and_writes_a_line_every_so_many_seconds(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
  stream = io.StringIO()

  def batches():  # no len(): the total is unknown, lines come by time only
    for batch in range(5):
      now[0] += 20.0  # each batch takes 20 s
      yield batch

  bar = progress.PlainProgress(None, "eval", "batch", stream=stream, iterable=batches())
  assert list(bar) == list(range(5))
  assert stream.getvalue().splitlines() == ["eval: 2 batches, 40 s", "eval: 4 batches, 80 s", "eval: 5 batches, 100 s"]


def test_bar_is_tqdm_in_a_notebook_even_where_ipykernel_is_merely_imported(monkeypatch):
  kernel_stream = type("OutStream", (io.StringIO,), {"__module__": "ipykernel.iostream"})()
  monkeypatch.setattr("sys.stderr", kernel_stream)
  assert not isinstance(progress.bar(10, "eval", "batch"), progress.PlainProgress)
  monkeypatch.setattr("sys.stderr", io.StringIO())
  monkeypatch.setitem(__import__("sys").modules, "ipykernel", types.ModuleType("ipykernel"))
  assert isinstance(progress.bar(10, "eval", "batch"), progress.PlainProgress)


def test_bar_takes_a_count_or_an_iterable(monkeypatch):
  monkeypatch.setattr("sys.stderr", io.StringIO())
  stream = io.StringIO()
  monkeypatch.setattr("sys.stdout", stream)
  assert [item * 2 for item in progress.bar(range(3), "double")] == [0, 2, 4]
  assert stream.getvalue().splitlines() == [f"double: {n}/3 its, 0 s" for n in (1, 2, 3)]
  assert progress.bar(7, "eval", "batch").total == 7
