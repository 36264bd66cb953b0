"""Tests for the local TFDS builder, row layouts, batching and `load_data`."""
import functools
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm_jax.data import batching
from ddlm_jax.data import corpus
from ddlm_jax.data import datasets
from ddlm_jax.data import local_text
from ddlm_jax.data import pairs
from ddlm_jax.data import tokenizers

SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"


def _write(path: pathlib.Path, content: str | bytes) -> str:
  if isinstance(content, str):
    content = content.encode()
  path.write_bytes(content)
  return str(path)


def _files_under(directory: pathlib.Path) -> list[str]:
  return sorted(str(path.relative_to(directory)) for path in directory.rglob("*"))


# Local text files through the TFDS builder.


def test_local_builder_on_tiny_shakespeare(tmp_path):
  if not SHAKESPEARE.exists():
    pytest.skip(f"tiny-shakespeare is not at {SHAKESPEARE}")
  path = str(shutil.copy(SHAKESPEARE, tmp_path / "input.txt"))
  train = local_text.load_local_texts([path], str(tmp_path / "tfds"), "train")
  validation = local_text.load_local_texts([path], str(tmp_path / "tfds"), "validation")
  assert (len(train), len(validation)) == (6861, 361)  # 7,222 speeches; round(5%) held out.
  assert train[0] == "First Citizen:\nBefore we proceed any further, hear me speak."
  assert validation[-1] == ("ANTONIO:\nNoble Sebastian,\nThou let'st thy fortune sleep--die, "
                            "rather; wink'st\nWhiles thou art waking.")
  assert train + validation == local_text.split_documents(SHAKESPEARE.read_text(), "paragraph")
  # A second data directory builds the very same dataset.
  assert local_text.load_local_texts([path], str(tmp_path / "again"), "validation") == validation


def test_local_builder_on_small_files(tmp_path):
  first = _write(tmp_path / "a.txt", "one\ntwo lines\n\n\n  three  \r\nfour\r\n\n")
  second = _write(tmp_path / "b.txt", "caf\u00e9 \u2615 na\u00efve\n\nlast")
  data_dir = str(tmp_path / "tfds")
  paragraphs = ["one\ntwo lines", "  three  \nfour", "caf\u00e9 \u2615 na\u00efve", "last"]
  load = functools.partial(local_text.load_local_texts, [first, second], data_dir)
  assert load("train", validation_fraction=0.5) == paragraphs[:2]
  assert load("validation", validation_fraction=0.5) == paragraphs[2:]
  assert load("train", validation_fraction=0.01) == paragraphs[:3]  # At least one held out.
  assert load("validation", unit="line", validation_fraction=0.4) == ["caf\u00e9 \u2615 na\u00efve",
                                                                      "last"]
  assert load("train", unit="line", validation_fraction=0.4) == ["one", "two lines", "  three  ",
                                                                 "four"]
  assert load("train", validation_fraction=0.5, max_texts=1) == paragraphs[:1]
  assert len(os.listdir(os.path.join(data_dir, "local_text"))) == 3  # One dataset per setting.
  assert any(file.endswith("train.array_record-00000-of-00001")
             for file in _files_under(tmp_path / "tfds"))


def test_local_dataset_is_rebuilt_when_a_file_changes(tmp_path):
  path = _write(tmp_path / "a.txt", "alpha\n\nbeta\n\ngamma")
  data_dir = str(tmp_path / "tfds")
  assert local_text.load_local_texts([path], data_dir, "validation") == ["gamma"]
  _write(tmp_path / "a.txt", "alpha\n\nbeta\n\ndelta")
  assert local_text.load_local_texts([path], data_dir, "validation") == ["delta"]


def test_catalog_names_are_read_through_tfds(tmp_path):
  path = _write(tmp_path / "a.txt", "alpha\n\nbeta\n\ngamma")
  data_dir = str(tmp_path / "tfds")
  local_text.load_local_texts([path], data_dir, "train")
  name = f"local_text/{local_text.make_config([path]).name}"
  assert local_text.load_catalog_texts(name, "train", data_dir) == ["alpha", "beta"]
  with pytest.raises(ValueError, match="has no split 'test'; it has \\['train', 'validation'\\]"):
    local_text.load_catalog_texts(name, "test", data_dir)
  with pytest.raises(ValueError, match="has no feature 'content'"):
    local_text.load_catalog_texts(name, "train", data_dir, text_key="content")


def test_unavailable_catalog_datasets_fail_clearly(tmp_path):
  with pytest.raises(ValueError, match="TFDS has no dataset named 'no_such_corpus'"):
    local_text.load_catalog_texts("no_such_corpus", "train", str(tmp_path))
  with pytest.raises(ValueError, match="'tiny_shakespeare' is not prepared in .*network access"):
    local_text.load_catalog_texts("tiny_shakespeare", "train", str(tmp_path), download=False)
  assert not _files_under(tmp_path)


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"", "empty.txt has no documents"),
    ("blank.txt", b"  \n\n\t\n", "blank.txt has no documents"),
    ("nul.txt", b"text\x00\x01\x02more", "nul.txt contains NUL bytes"),
    ("latin1.txt", "caf\u00e9".encode("latin-1"), "latin1.txt is not valid UTF-8"),
])
def test_bad_files_fail_before_anything_is_written(name, content, message, tmp_path):
  good = _write(tmp_path / "good.txt", "fine\n\ntext")
  bad = _write(tmp_path / name, content)
  data_dir = tmp_path / "tfds"
  with pytest.raises(ValueError, match=message):
    local_text.load_local_texts([good, bad], str(data_dir), "train")
  assert not data_dir.exists()


def test_missing_file_and_single_document_fail_clearly(tmp_path):
  with pytest.raises(ValueError, match="missing.txt does not exist"):
    local_text.load_local_texts([str(tmp_path / "missing.txt")], str(tmp_path / "tfds"), "train")
  single = _write(tmp_path / "single.txt", "only one paragraph\nof two lines")
  with pytest.raises(ValueError, match=r"single.txt: 1 document \(a paragraph .* at least 2: .*unit='stream'"):
    local_text.load_local_texts([single], str(tmp_path / "tfds"), "train")
  with pytest.raises(ValueError, match=r"line.txt: 1 document \(a line ends at a newline\)"):
    local_text.load_local_texts([_write(tmp_path / "line.txt", "one line\n")], str(tmp_path / "tfds"), "train",
                                unit="line")
  for unit in ("paragraph", "line", "stream"):  # refused before TFDS writes anything
    with pytest.raises(ValueError, match=r"validation_fraction must be in \(0, 1\), got 1.0"):
      local_text.load_local_texts([_write(tmp_path / "two.txt", "one\n\ntwo\n")], str(tmp_path / "tfds"), "train",
                                  unit=unit, validation_fraction=1.0)
  assert not (tmp_path / "tfds").exists()


# Row layouts.


def test_pad_documents_layout():
  rows = batching.pad_documents([[5, 6], [], [7, 8, 9, 10, 11]], 4, eos_id=3, pad_id=0)
  np.testing.assert_array_equal(rows, [[5, 6, 3, 0], [3, 0, 0, 0], [7, 8, 9, 3]])
  assert rows.dtype == np.int32
  assert batching.count_truncated([[5, 6], [], [7, 8, 9, 10, 11], [1, 2, 3]], 4) == 1


def test_pack_documents_layout():
  rows = batching.pack_documents([[5, 6], [], [7, 8, 9, 10, 11], [12, 13]], 3, eos_id=3)
  # Stream: 5 6 3 | 3 | 7 8 9 10 11 3 | 12 13 3: 13 tokens, four full rows, the last EOS dropped.
  np.testing.assert_array_equal(rows, [[5, 6, 3], [3, 7, 8], [9, 10, 11], [3, 12, 13]])
  assert rows.dtype == np.int32
  assert batching.pack_documents([[5]], 3, eos_id=3).shape == (0, 3)


@pytest.mark.parametrize("layout", [
    lambda: batching.pad_documents([[5]], 1, eos_id=3, pad_id=0),
    lambda: batching.pack_documents([[5]], 1, eos_id=3),
])
def test_layouts_reject_rows_shorter_than_two(layout):
  with pytest.raises(ValueError, match="seq_len must be at least 2"):
    layout()


# Batches.


def _numbered_rows(num_rows: int) -> np.ndarray:
  """int32[N, 2] rows whose first column is the row's index."""
  return np.stack([np.arange(num_rows), np.zeros(num_rows)], axis=1).astype(np.int32)


def test_batches_are_deterministic_and_depend_on_the_seed():
  first, second, other_seed = (batching.BatchIterator(_numbered_rows(40), 8, seed)
                               for seed in (0, 0, 1))
  batches = [next(first) for _ in range(12)]  # Two and a bit epochs of 5 steps.
  for batch in batches:
    np.testing.assert_array_equal(next(second), batch)
  first_epoch = np.concatenate([batch[:, 0] for batch in batches[:5]])
  other_first_epoch = np.concatenate([next(other_seed)[:, 0] for _ in range(5)])
  assert not np.array_equal(other_first_epoch, first_epoch)


def test_each_epoch_visits_every_row_once_in_a_new_order():
  batches = batching.BatchIterator(_numbered_rows(12), 4, seed=3)
  epochs = [np.concatenate([next(batches)[:, 0] for _ in range(3)]) for _ in range(3)]
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(12))
  assert not np.array_equal(epochs[0], epochs[1])
  assert batches.get_state() == {"epoch": 3, "position": 0}


def test_incomplete_last_batch_is_dropped():
  batches = batching.BatchIterator(_numbered_rows(10), 4, seed=0)
  assert batches.steps_per_epoch == 2
  seen = np.concatenate([next(batches)[:, 0] for _ in range(2)])
  assert len(set(seen.tolist())) == 8
  assert batches.get_state() == {"epoch": 1, "position": 0}


def test_restoring_the_state_reproduces_the_next_batches():
  batches = batching.BatchIterator(_numbered_rows(30), 4, seed=7)
  for _ in range(9):  # Into the second epoch (7 steps each).
    next(batches)
  state = batches.get_state()
  expected = [next(batches) for _ in range(10)]
  restored = batching.BatchIterator(_numbered_rows(30), 4, seed=7)
  restored.set_state(state)
  for batch in expected:
    np.testing.assert_array_equal(next(restored), batch)
  with pytest.raises(ValueError, match="invalid iterator state"):
    restored.set_state({"epoch": 0, "position": 7})


def test_process_slices_partition_the_global_batch():
  rows = _numbered_rows(64)
  global_batches = batching.BatchIterator(rows, 16, seed=1)
  local_batches = [batching.BatchIterator(rows, 16, seed=1, process_index=index, process_count=4)
                   for index in range(4)]
  for _ in range(6):
    local = [next(batches) for batches in local_batches]
    assert all(batch.shape == (4, 2) for batch in local)
    np.testing.assert_array_equal(np.concatenate(local), next(global_batches))


@pytest.mark.parametrize("batch_size,kwargs,message", [
    (11, {}, r"batch_size \(11\) is larger than the number of rows \(10\)"),
    (6, {"process_count": 4}, "divisible by process_count"),
    (4, {"process_index": 2, "process_count": 2}, "process_index 2 is not in"),
])
def test_bad_batch_settings_fail_clearly(batch_size, kwargs, message):
  with pytest.raises(ValueError, match=message):
    batching.BatchIterator(_numbered_rows(10), batch_size, 0, **kwargs)


# load_data.


def _tiny_config(**overrides) -> datasets.DataConfig:
  settings = dict(num_train_docs=300, num_eval_docs=20, vocab_size=400, seq_len=48)
  return datasets.DataConfig(**{**settings, **overrides})


@pytest.mark.parametrize("kind", tokenizers.KINDS)
def test_embedded_source_end_to_end(kind, tmp_path):
  seq_len = {"char": 200, "sentencepiece": 80}[kind]  # some documents fit, some are cut
  config = _tiny_config(tokenizer=kind, seq_len=seq_len)
  data = datasets.load_data(config, str(tmp_path))
  tokenizer = data.tokenizer
  assert tokenizer.kind == kind
  assert data.train_rows.shape == (300, seq_len) and data.eval_rows.shape == (20, seq_len)
  assert data.train_rows.dtype == data.eval_rows.dtype == np.int32 and data.train_stream is None
  generator = corpus.default_corpus()
  expected = generator.sample(20, corpus.split_seed("validation", 0))
  assert data.eval_texts == tuple(doc.text for doc in expected)
  lengths = np.array([len(tokenizer.encode(text)) for text in data.eval_texts])
  fits = lengths <= seq_len - 1
  assert 0 < fits.sum() < 20
  expected_log_probs = [generator.log_prob(t) if fit else np.nan for t, fit in zip(data.eval_texts, fits)]
  np.testing.assert_allclose(data.eval_log_probs, expected_log_probs)
  np.testing.assert_array_equal(data.eval_num_tokens, np.minimum(lengths, seq_len - 1))
  assert data.num_truncated == (~fits).sum() + sum(
      len(tokenizer.encode(doc.text)) > seq_len - 1
      for doc in generator.sample(300, corpus.split_seed("train", 0)))
  for row, text, length in zip(data.eval_rows, data.eval_texts, lengths):
    if length <= seq_len - 1:
      assert tokenizer.decode(row) == text
      assert row[length] == tokenizer.eos_id and not row[length + 1:].any()
  assert tokenizers.load_tokenizer(str(tmp_path / "tokenizer")).vocab_size == tokenizer.vocab_size
  # Loading again reuses the cached tokenizer and gives identical rows.
  again = datasets.load_data(config, str(tmp_path))
  np.testing.assert_array_equal(again.train_rows, data.train_rows)


def test_embedded_source_packed(tmp_path):
  data = datasets.load_data(_tiny_config(packing="pack", tokenizer="char"), str(tmp_path))
  assert data.eval_log_probs is None and data.num_truncated == 0
  assert not np.any(data.train_rows == tokenizers.PAD_ID)
  stream = np.concatenate([data.tokenizer.encode(text) + [tokenizers.EOS_ID]
                           for text in data.eval_texts])
  assert 0 <= len(stream) - data.eval_rows.size < 48
  np.testing.assert_array_equal(data.eval_rows.reshape(-1), stream[:data.eval_rows.size])
  np.testing.assert_array_equal(data.eval_num_tokens,
                                np.sum(data.eval_rows != tokenizers.EOS_ID, axis=1))
  np.testing.assert_array_equal(data.eval_num_chars, data.eval_num_tokens)  # One character a token.
  train_texts = [doc.text for doc in corpus.default_corpus().sample(300, corpus.split_seed("train", 0))]
  train_stream = [token for text in train_texts for token in data.tokenizer.encode(text) + [tokenizers.EOS_ID]]
  np.testing.assert_array_equal(data.train_stream, train_stream)
  np.testing.assert_array_equal(data.train_rows.reshape(-1), data.train_stream[:data.train_rows.size])


def test_text_files_source_trains_the_tokenizer_on_the_train_split_only(tmp_path):
  train_part = "\n\n".join(f"Record {i}: the \u0416 sits on line {i}." for i in range(40))
  path = _write(tmp_path / "notes.txt", train_part + "\n\nHeld out: \u03a9mega.")
  workdir = tmp_path / "run"
  config = _tiny_config(source="text_files", paths=(path,), validation_fraction=0.02,
                        vocab_size=320)
  data = datasets.load_data(config, str(workdir))
  assert data.eval_texts == ("Held out: \u03a9mega.",)
  assert data.train_rows.shape == (40, 48) and data.eval_log_probs is None
  assert data.tokenizer.decode(data.eval_rows[0]) == "Held out: \u03a9mega."
  assert len(data.tokenizer.encode("\u0416")) == 1  # Seen in training: one piece.
  assert len(data.tokenizer.encode("\u03a9")) == 2  # Only in validation: two byte tokens.
  assert {"tfds", "tokenizer"} <= set(os.listdir(workdir))


def test_tfds_source_reads_a_prepared_dataset_by_name_and_cuts_its_examples(tmp_path):
  # A dataset prepared by the local builder, one speech per example, stands in for a downloaded
  # catalog dataset; the 'tfds' source cuts each example into lines.
  book = "\n\n".join(f"Speaker {i}:\nA line of verse, number {i}." for i in range(30))
  path = _write(tmp_path / "book.txt", f"{book}\n\n{book}")
  data_dir = str(tmp_path / "tfds_data")
  local_text.load_local_texts([path], data_dir, "train", validation_fraction=0.5)
  name = f"local_text/{local_text.make_config([path], validation_fraction=0.5).name}"
  config = _tiny_config(source="tfds", tfds_name=name, tfds_data_dir=data_dir, unit="line",
                        tokenizer="char", num_train_docs=25, num_eval_docs=4)
  data = datasets.load_data(config, str(tmp_path / "run"))
  assert data.train_rows.shape == (25, 48)
  assert data.eval_texts == ("Speaker 0:", "A line of verse, number 0.", "Speaker 1:",
                             "A line of verse, number 1.")


@pytest.mark.parametrize("content", [b"", b"\x00\x01binary\x02"])
def test_bad_text_files_fail_before_anything_is_written(content, tmp_path):
  path = _write(tmp_path / "bad.txt", content)
  workdir = tmp_path / "run"
  workdir.mkdir()
  with pytest.raises(ValueError, match="bad.txt"):
    datasets.load_data(_tiny_config(source="text_files", paths=(path,)), str(workdir))
  with pytest.raises(ValueError, match="missing.txt does not exist"):
    datasets.load_data(_tiny_config(source="text_files", paths=(str(tmp_path / "missing.txt"),)),
                       str(workdir))
  assert not _files_under(workdir)


@pytest.mark.parametrize("overrides,field", [
    ({"source": "web"}, "DataConfig.source is 'web'"),
    ({"tokenizer": "bytes"}, "DataConfig.tokenizer"),
    ({"packing": "stream"}, "DataConfig.packing"),
    ({"unit": "page"}, "DataConfig.unit"),
    ({"num_train_docs": 0}, "DataConfig.num_train_docs must be positive"),
    ({"vocab_size": -1}, "DataConfig.vocab_size"),
    ({"seq_len": 1}, "DataConfig.seq_len"),
    ({"validation_fraction": 1.0}, "DataConfig.validation_fraction"),
    ({"source": "text_files"}, "DataConfig.paths"),
    ({"source": "tfds"}, "DataConfig.tfds_name"),
    ({"task": "translate"}, "DataConfig.task is 'translate'"),
    ({"task": "text_to_data", "source": "text_files", "paths": ("a.txt",)},
     "DataConfig.task='text_to_data' needs source='embedded' and packing='pad'"),
    ({"task": "data_to_text", "packing": "pack"}, "DataConfig.task='data_to_text' needs"),
    ({"task": "data_to_text", "record_attributes": ("name", "colour")},
     "DataConfig.record_attributes must be distinct names"),
    ({"task": "data_to_text", "record_attributes": ("name", "name")}, "DataConfig.record_attributes"),
    ({"record_attributes": ("name",)}, "DataConfig.record_attributes applies to the pair tasks"),
])
def test_bad_config_fails_naming_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    datasets.DataConfig(**overrides)


def test_config_accepts_a_single_path_and_lists():
  assert datasets.DataConfig(source="text_files", paths="a.txt").paths == ("a.txt",)
  assert datasets.DataConfig(source="text_files", paths=["a.txt", "b.txt"]).paths == ("a.txt",
                                                                                       "b.txt")


# Sequence-to-sequence pairs.


@pytest.mark.parametrize("task,kind,seq_len", [
    ("data_to_text", "char", 320), ("text_to_data", "char", 320), ("data_to_text", "sentencepiece", 200),
])
def test_pair_rows_hold_source_eos_target(task, kind, seq_len, tmp_path):
  config = _tiny_config(task=task, tokenizer=kind, seq_len=seq_len, num_train_docs=200)
  data = datasets.load_data(config, str(tmp_path))
  tokenizer = data.tokenizer
  evaluation = corpus.default_corpus().sample(20, corpus.split_seed("validation", 0))
  records = tuple(corpus.format_record(document.record) for document in evaluation)
  texts = tuple(document.text for document in evaluation)
  sources, targets = (records, texts) if task == "data_to_text" else (texts, records)
  assert data.eval_sources == sources and data.eval_targets == data.eval_texts == targets
  assert data.eval_records == tuple(document.record for document in evaluation)
  assert data.eval_log_probs is None and data.eval_rows.shape == (20, seq_len)
  if kind == "char":  # The records were trained on: their characters are in the alphabet.
    assert {"|", "_", ":"} <= set(tokenizer.alphabet)
  else:
    assert len(tokenizer.encode(" | eat_type: ")) < len(" | eat_type: ")
  source_mask = pairs.source_mask(data.eval_rows, tokenizer.eos_id)
  num_cut = 0
  for row, is_source, source, target, num_tokens, num_chars in zip(
      data.eval_rows, source_mask, sources, targets, data.eval_num_tokens, data.eval_num_chars):
    source_ids, target_ids = tokenizer.encode(source), tokenizer.encode(target)
    np.testing.assert_array_equal(is_source, np.arange(seq_len) <= len(source_ids))
    np.testing.assert_array_equal(row[:len(source_ids) + 1], source_ids + [tokenizer.eos_id])
    kept = min(len(target_ids), seq_len - len(source_ids) - 2)
    num_cut += kept < len(target_ids)
    target_row = row[~is_source]
    np.testing.assert_array_equal(target_row[:kept + 1], target_ids[:kept] + [tokenizer.eos_id])
    assert not target_row[kept + 1:].any()
    assert tokenizer.decode(row[is_source]) == source
    assert tokenizer.decode(target_row) == (target if kept == len(target_ids) else
                                            tokenizer.decode(target_ids[:kept]))
    assert num_tokens == kept and num_chars == len(tokenizer.decode(target_row))
  assert 0 < num_cut < 20 and data.num_truncated >= num_cut
  train_mask = pairs.source_mask(data.train_rows, tokenizer.eos_id)
  assert (data.train_rows[train_mask] == tokenizer.eos_id).sum() == 200  # One source [EOS] a row.


def test_pair_records_hold_the_chosen_attributes(tmp_path):
  config = _tiny_config(task="text_to_data", tokenizer="char", seq_len=400,
                        record_attributes=["name", "near"])
  assert config.record_attributes == ("name", "near") and hash(config)
  data = datasets.load_data(config, str(tmp_path))
  for target, record in zip(data.eval_targets, data.eval_records):
    assert corpus.parse_record(target) == {key: record[key] for key in ("name", "near") if key in record}
  assert data.num_truncated == 0


def test_pair_source_longer_than_a_row_fails_clearly(tmp_path):
  with pytest.raises(ValueError, match="raise DataConfig.seq_len to at least"):
    datasets.load_data(_tiny_config(task="text_to_data", tokenizer="char", seq_len=120), str(tmp_path))


def test_source_mask_under_jit():
  rows = np.array([[5, 6, 3, 7, 3, 0], [3, 5, 3, 0, 0, 0], [5, 5, 5, 5, 5, 5]], np.int32)
  expected = [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]  # No [EOS]: all source.
  np.testing.assert_array_equal(pairs.source_mask(rows, 3), expected)
  mask = jax.jit(pairs.source_mask, static_argnums=1)(jnp.asarray(rows), 3)
  assert isinstance(mask, jax.Array) and mask.dtype == jnp.bool_
  np.testing.assert_array_equal(mask, expected)
