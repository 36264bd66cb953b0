"""Tests for character streams (unit='stream'), the whole-text alphabet and training windows."""
import dataclasses
import functools
import pathlib
import shutil

import numpy as np
import pytest

from ddlm_jax.data import batching
from ddlm_jax.data import datasets
from ddlm_jax.data import local_text
from ddlm_jax.data import tokenizers

SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"


def _write(path: pathlib.Path, text: str) -> str:
  path.write_bytes(text.encode())
  return str(path)


def _stream_config(paths, **overrides) -> datasets.DataConfig:
  settings = dict(source="text_files", paths=tuple(paths), unit="stream", packing="pack", tokenizer="char",
                  seq_len=8, validation_fraction=0.25)
  return datasets.DataConfig(**{**settings, **overrides})


# The stream of local files and its split.


def test_files_are_one_stream_with_every_character_kept(tmp_path):
  first = _write(tmp_path / "a.txt", "one\r\n\n  two")  # No final newline: one is added.
  second = _write(tmp_path / "b.txt", "three\n")
  third = _write(tmp_path / "c.txt", "\tfour")
  assert local_text.read_stream([first, second, third]) == "one\r\n\n  two\nthree\n\tfour"
  assert local_text.read_stream([second, third]) == "three\n\tfour"
  with pytest.raises(ValueError, match="empty.txt is empty"):
    local_text.read_stream([first, _write(tmp_path / "empty.txt", "")])


def test_stream_split_holds_out_the_last_characters():
  text = "abcdefghij"
  assert local_text.split_stream(text, 0.3) == ("abcdefg", "hij")
  assert local_text.split_stream(text, 0.04) == ("abcdefghi", "j")  # round(9.6): both parts non-empty.
  assert local_text.split_stream(text, 0.99) == ("a", "bcdefghij")
  with pytest.raises(ValueError, match="at least 2 characters"):
    local_text.split_stream("a", 0.5)


def test_local_builder_stores_a_stream_in_bounded_chunks(tmp_path, monkeypatch):
  monkeypatch.setattr(local_text, "STREAM_CHUNK_CHARS", 4)
  text = "Line one\r\nline two\n\nthe caf\u00e9 end"
  path = _write(tmp_path / "a.txt", text)
  load = functools.partial(local_text.load_local_texts, [path], str(tmp_path / "tfds"), unit="stream",
                           validation_fraction=0.3)
  train, validation = load("train"), load("validation")
  cut = round(len(text) * 0.7)
  assert "".join(train) == text[:cut] and "".join(validation) == text[cut:]
  assert all(len(chunk) == 4 for chunk in train[:-1] + validation[:-1]) and len(train) == 6
  assert local_text.make_config([path], unit="stream").name.startswith("stream_")


@pytest.mark.parametrize("overrides,message", [
    ({"source": "embedded"}, "DataConfig.unit='stream' reads the text of files or of a TFDS dataset: it needs "
                             "source='text_files' or 'tfds', not 'embedded'"),
    ({"packing": "pad"}, "DataConfig.unit='stream' has no documents to put one per row: it needs packing='pack'"),
])
def test_stream_settings_without_a_stream_fail_naming_the_setting(overrides, message):
  with pytest.raises(ValueError, match=message):
    _stream_config(["a.txt"], **overrides)


# Streams through load_data.


def test_every_character_of_a_stream_is_a_token(tmp_path):
  text = "To be,\r\nor not\n\nto be: that is the question.\nWhether 'tis nobler in the mind\n"
  path = _write(tmp_path / "a.txt", text)
  config = _stream_config([path], num_train_docs=1, num_eval_docs=1)  # They do not limit a stream.
  data = datasets.load_data(config, str(tmp_path / "run"))
  tokenizer = data.tokenizer
  cut = round(len(text) * 0.75)
  train_text, held_out = text[:cut], text[cut:]
  np.testing.assert_array_equal(data.train_stream, tokenizer.encode(train_text))  # No [EOS] anywhere.
  assert data.train_stream.dtype == np.int32 and {"\n", "\r"} <= set(tokenizer.alphabet)
  assert np.shares_memory(data.train_rows, data.train_stream)
  np.testing.assert_array_equal(data.train_rows.reshape(-1), data.train_stream[:data.train_rows.size])
  assert data.eval_texts == (held_out,)
  num_rows = len(held_out) // 8  # Consecutive windows; the tail shorter than a window is dropped.
  assert data.eval_rows.shape == (num_rows, 8)
  np.testing.assert_array_equal(data.eval_rows.reshape(-1), tokenizer.encode(held_out[:num_rows * 8]))
  np.testing.assert_array_equal(data.eval_num_tokens, np.full(num_rows, 8))
  np.testing.assert_array_equal(data.eval_num_chars, np.full(num_rows, 8))


def test_sentencepiece_stream_decodes_to_the_text_and_counts_its_characters(tmp_path):
  train_part = "".join(f"Line {i} of the book, with words.\n" for i in range(60))
  held_out = "The \u03a9mega and \u00e9t\u00e9 come here only.\n" + "Plain words at the end of it all.\n" * 3
  path = _write(tmp_path / "a.txt", train_part + held_out)
  config = _stream_config([path], tokenizer="sentencepiece", vocab_size=300, seq_len=16,
                          validation_fraction=len(held_out) / len(train_part + held_out))
  data = datasets.load_data(config, str(tmp_path / "run"))
  tokenizer = data.tokenizer
  assert data.eval_texts == (held_out,)
  assert tokenizer.decode(data.train_stream) == train_part
  assert not np.isin(data.train_stream, [tokenizer.eos_id, tokenizer.pad_id]).any()
  windows = tokenizer.decode(data.eval_rows.reshape(-1))
  assert "\u03a9mega" in windows and held_out.startswith(windows)
  assert data.eval_num_chars.sum() == len(windows) and (data.eval_num_tokens == 16).all()
  assert data.eval_num_chars[0] < 16  # Byte-fallback ids of unseen characters hold parts of one.


def test_catalog_stream_joins_a_split_s_examples_with_newlines(tmp_path):
  # A dataset prepared by the local builder, one line per example, stands in for a catalog dataset.
  lines = [f"Verse {i}, as spoken." for i in range(20)]
  path = _write(tmp_path / "book.txt", "\n".join(lines))
  data_dir = str(tmp_path / "tfds_data")
  local_text.load_local_texts([path], data_dir, "train", unit="line", validation_fraction=0.5)
  name = f"local_text/{local_text.make_config([path], unit='line', validation_fraction=0.5).name}"
  config = datasets.DataConfig(source="tfds", tfds_name=name, tfds_data_dir=data_dir, unit="stream",
                               packing="pack", tokenizer="char", seq_len=8, num_train_docs=2)
  data = datasets.load_data(config, str(tmp_path / "run"))
  assert data.tokenizer.decode(data.train_stream) == "\n".join(lines[:10])
  assert data.eval_texts == ("\n".join(lines[10:]),)


def test_held_out_part_shorter_than_a_row_fails_naming_the_settings(tmp_path):
  path = _write(tmp_path / "a.txt", "x" * 95 + "tail\n")
  with pytest.raises(ValueError, match="the held-out part has 5 tokens, fewer than one row of "
                                       "DataConfig.seq_len=8: raise DataConfig.validation_fraction"):
    datasets.load_data(_stream_config([path], validation_fraction=0.05), str(tmp_path / "run"))


def test_stream_on_tiny_shakespeare(tmp_path):
  if not SHAKESPEARE.exists():
    pytest.skip(f"tiny-shakespeare is not at {SHAKESPEARE}")
  path = str(shutil.copy(SHAKESPEARE, tmp_path / "input.txt"))
  text = SHAKESPEARE.read_text()
  data = datasets.load_data(_stream_config([path], seq_len=256, validation_fraction=0.05), str(tmp_path / "run"))
  (held_out,) = data.eval_texts
  assert abs(len(held_out) - 0.05 * len(text)) <= 1 and text.endswith(held_out)
  assert data.tokenizer.decode(data.train_stream) == text[:len(text) - len(held_out)]
  windows = data.tokenizer.decode(data.eval_rows.reshape(-1))
  assert len(windows) == len(held_out) // 256 * 256 and held_out.startswith(windows)
  assert data.eval_num_chars.sum() == len(windows)


# The character alphabet comes from the whole text.


def test_char_alphabet_holds_characters_seen_only_in_the_held_out_part(tmp_path):
  train_part = "\n\n".join(f"Record {i}: nothing odd here." for i in range(30))
  held_out = ["Held out: \u03a9mega!", "Also held out: \u00e6sc.", "Last: #7 \u2615"]
  path = _write(tmp_path / "notes.txt", train_part + "\n\n" + "\n\n".join(held_out))
  config = datasets.DataConfig(source="text_files", paths=(path,), tokenizer="char", seq_len=32,
                               validation_fraction=3 / 33, num_eval_docs=2)
  data = datasets.load_data(config, str(tmp_path / "run"))
  assert data.eval_texts == tuple(held_out[:2])
  for row, text in zip(data.eval_rows, held_out):
    assert data.tokenizer.decode(row) == text
  assert {"\u03a9", "\u00e6", "!", "#", "7", "\u2615"} <= set(data.tokenizer.alphabet)  # Unevaluated text too.
  # The same documents read as a catalog dataset (the builder's output in the run's tfds directory).
  name = f"local_text/{local_text.make_config([path], validation_fraction=3 / 33).name}"
  catalog = datasets.load_data(dataclasses.replace(config, source="tfds", tfds_name=name, paths=(),
                                                   tfds_data_dir=str(tmp_path / "run" / "tfds")),
                               str(tmp_path / "catalog"))
  assert [catalog.tokenizer.decode(row) for row in catalog.eval_rows] == held_out[:2]
  stream = datasets.load_data(_stream_config([path], validation_fraction=0.1), str(tmp_path / "stream"))
  windows = stream.tokenizer.decode(stream.eval_rows.reshape(-1))
  assert "\u03a9" in windows and "\u03a9" not in stream.tokenizer.decode(stream.train_stream)
  assert stream.eval_texts[0].startswith(windows) and "\n" in stream.tokenizer.alphabet


def test_sentencepiece_is_trained_on_the_training_documents_the_config_reads(tmp_path):
  documents = [f"Record {i}: the {'boat' if i < 5 else 'zebra'} sails." for i in range(40)]
  path = _write(tmp_path / "notes.txt", "\n\n".join(documents))
  config = datasets.DataConfig(source="text_files", paths=(path,), seq_len=32, vocab_size=300, num_train_docs=5)
  data = datasets.load_data(config, str(tmp_path / "run"))
  expected = tokenizers.SentencePieceTokenizer.train(documents[:5], 300)
  assert data.tokenizer.model_proto == expected.model_proto


# Training windows.


def test_windows_are_deterministic_contiguous_and_resumable():
  stream_T = np.arange(100, 150, dtype=np.int32)
  windows = batching.WindowIterator(stream_T, 6, 4, seed=3)
  assert (windows.batch_size, windows.local_batch_size) == (4, 4)
  batches = [next(windows) for _ in range(10)]
  for batch_BL in batches:
    assert batch_BL.shape == (4, 6) and batch_BL.dtype == np.int32
    np.testing.assert_array_equal(batch_BL, batch_BL[:, :1] + np.arange(6))  # stream[o:o + L]
  for n in (0, 7):  # Batch n's offsets come from a generator seeded with (seed, n).
    np.testing.assert_array_equal(batches[n][:, 0] - 100, np.random.default_rng([3, n]).integers(45, size=4))
  again = batching.WindowIterator(stream_T, 6, 4, seed=3)
  for batch_BL in batches:
    np.testing.assert_array_equal(next(again), batch_BL)
  assert windows.get_state() == {"batch": 10}
  expected = [next(windows) for _ in range(3)]
  resumed = batching.WindowIterator(stream_T, 6, 4, seed=3)
  resumed.set_state({"batch": 10})
  for batch_BL in expected:
    np.testing.assert_array_equal(next(resumed), batch_BL)
  other_seed = batching.WindowIterator(stream_T, 6, 4, seed=4)
  assert not np.array_equal(next(other_seed), batches[0])


def test_window_offsets_cover_the_whole_stream():
  windows = batching.WindowIterator(np.arange(20, dtype=np.int32), 5, 8, seed=0)
  offsets = np.concatenate([next(windows)[:, 0] for _ in range(50)])
  np.testing.assert_array_equal(np.unique(offsets), np.arange(16))  # Every offset in [0, T - L].


def test_window_process_slices_partition_the_global_batch():
  stream_T = np.arange(64, dtype=np.int32)
  global_windows = batching.WindowIterator(stream_T, 4, 8, seed=1)
  local_windows = [batching.WindowIterator(stream_T, 4, 8, seed=1, process_index=index, process_count=4)
                   for index in range(4)]
  assert local_windows[0].local_batch_size == 2
  for _ in range(5):
    np.testing.assert_array_equal(np.concatenate([next(windows) for windows in local_windows]),
                                  next(global_windows))


@pytest.mark.parametrize("stream,kwargs,message", [
    (np.arange(5), {}, "the stream has 5 tokens, fewer than one window of seq_len=6"),
    (np.zeros((2, 8)), {}, "1-D"),
    (np.arange(20), {"batch_size": 0}, r"batch_size \(0\) must be positive"),
    (np.arange(20), {"batch_size": 6, "process_count": 4}, "divisible by process_count"),
    (np.arange(20), {"process_index": 2, "process_count": 2}, "process_index 2 is not in"),
])
def test_bad_window_settings_fail_clearly(stream, kwargs, message):
  with pytest.raises(ValueError, match=message):
    batching.WindowIterator(stream, 6, **{"batch_size": 4, "seed": 0, **kwargs})


@pytest.mark.parametrize("state", [{"batch": -1}, {"epoch": 0, "position": 3}])
def test_bad_window_state_fails_clearly(state):
  windows = batching.WindowIterator(np.arange(20), 6, 4, seed=0)
  with pytest.raises(ValueError, match="invalid window iterator state"):
    windows.set_state(state)


@pytest.mark.parametrize("unit", ["stream", "paragraph"])
def test_train_batches_follow_train_windows(unit, tmp_path):
  path = _write(tmp_path / "a.txt", "\n\n".join(f"Paragraph {i} says little." for i in range(40)))
  config = _stream_config([path], unit=unit, validation_fraction=0.1)
  data = datasets.load_data(config, str(tmp_path / "run"))
  if unit == "paragraph":  # Documents each followed by [EOS].
    assert (data.train_stream == data.tokenizer.eos_id).sum() == 36
  processes = dict(process_index=1, process_count=2)
  rows = datasets.train_batches(data, config, 4, 0, **processes)
  assert isinstance(rows, batching.BatchIterator) and rows.local_batch_size == 2
  np.testing.assert_array_equal(next(rows), next(batching.BatchIterator(data.train_rows, 4, 0, **processes)))
  random_config = _stream_config([path], unit=unit, validation_fraction=0.1, train_windows="random")
  windows = datasets.train_batches(data, random_config, 4, 0, **processes)
  assert isinstance(windows, batching.WindowIterator) and windows.local_batch_size == 2
  np.testing.assert_array_equal(next(windows), next(batching.WindowIterator(data.train_stream, 8, 4, 0,
                                                                            **processes)))
