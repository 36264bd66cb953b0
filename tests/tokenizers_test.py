"""Tests for ddlm_jax.data.tokenizers: round trips, special ids, determinism, caching."""
import os
import pathlib

import numpy as np
import pytest

from ddlm_jax.data import corpus
from ddlm_jax.data import tokenizers

SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"
PRINTABLE_ASCII = "".join(chr(code) for code in range(32, 127)) + "\n\t"


class _Unreadable:
  """Training texts that fail the test if anything reads them."""

  def __iter__(self):
    raise AssertionError("training texts were read although a tokenizer was cached")


@pytest.fixture(scope="module")
def embedded_texts() -> list[str]:
  docs = corpus.default_corpus().sample(3000, seed=corpus.split_seed("train"))
  return [doc.text for doc in docs]


@pytest.fixture(scope="module")
def shakespeare_lines() -> list[str]:
  if not SHAKESPEARE.exists():
    pytest.skip(f"tiny-shakespeare is not at {SHAKESPEARE}")
  return [line for line in SHAKESPEARE.read_text().split("\n") if line]


@pytest.fixture(scope="module")
def embedded_tokenizers(embedded_texts) -> dict[str, tokenizers.Tokenizer]:
  return {"char": tokenizers.CharTokenizer.train(embedded_texts),
          "sentencepiece": tokenizers.SentencePieceTokenizer.train(embedded_texts, 512)}


@pytest.fixture(scope="module")
def shakespeare_tokenizers(shakespeare_lines) -> dict[str, tokenizers.Tokenizer]:
  # One 300 kB text (the first 8,000 lines) exercises the cutting of long training texts.
  text = "\n".join(shakespeare_lines[:8000])
  return {"char": tokenizers.CharTokenizer.train([text, *shakespeare_lines]),
          "sentencepiece": tokenizers.SentencePieceTokenizer.train([text], 512, model_type="bpe")}


@pytest.mark.parametrize("kind", tokenizers.KINDS)
def test_round_trip_on_embedded_corpus(kind, embedded_tokenizers, embedded_texts):
  tokenizer = embedded_tokenizers[kind]
  for text in embedded_texts:
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("kind", tokenizers.KINDS)
def test_round_trip_on_shakespeare_lines(kind, shakespeare_tokenizers, shakespeare_lines):
  tokenizer = shakespeare_tokenizers[kind]
  for line in shakespeare_lines:
    assert tokenizer.decode(tokenizer.encode(line)) == line
  paragraph = "\n".join(shakespeare_lines[-5:]) + "\n\n  two  spaces "
  assert tokenizer.decode(tokenizer.encode(paragraph)) == paragraph


def test_sentencepiece_round_trips_printable_ascii_unseen_in_training(embedded_tokenizers):
  tokenizer = embedded_tokenizers["sentencepiece"]
  unseen = "".join(sorted(set(PRINTABLE_ASCII) - set(embedded_tokenizers["char"].alphabet)))
  assert len(unseen) > 10  # The corpus lacks digits and most symbols: byte fallback is exercised.
  for text in (PRINTABLE_ASCII, unseen, " lead", "trail ", "a\n\nb", "[MASK] [EOS] <unk>"):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("kind", tokenizers.KINDS)
def test_special_ids_are_the_same_in_every_tokenizer(kind, embedded_tokenizers, embedded_texts):
  tokenizer = embedded_tokenizers[kind]
  assert tokenizers.SPECIAL_TOKENS == ("[PAD]", "[MASK]", "[BOS]", "[EOS]")
  assert (tokenizer.pad_id, tokenizer.mask_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
  assert all(min(tokenizer.encode(text)) >= 4 for text in embedded_texts[:200])
  assert max(max(tokenizer.encode(text)) for text in embedded_texts) < tokenizer.vocab_size


def test_sentencepiece_model_places_special_pieces_at_their_ids(embedded_tokenizers):
  processor = embedded_tokenizers["sentencepiece"]._processor
  assert [processor.id_to_piece(i) for i in range(4)] == list(tokenizers.SPECIAL_TOKENS)
  assert (processor.pad_id(), processor.bos_id(), processor.eos_id()) == (0, 2, 3)
  assert processor.is_control(tokenizers.MASK_ID)
  assert processor.encode("[MASK]") != [tokenizers.MASK_ID]  # Never produced from text.


@pytest.mark.parametrize("kind,mask_text", [("char", "_"), ("sentencepiece", "[MASK]")])
def test_decode_reads_special_tokens(kind, mask_text, embedded_tokenizers):
  tokenizer = embedded_tokenizers[kind]
  left, right = tokenizer.encode("The Golden"), tokenizer.encode(" is a pub.")
  row = ([tokenizers.BOS_ID] + left + [tokenizers.MASK_ID] + right + [tokenizers.EOS_ID] + left
         + [tokenizers.PAD_ID] * 3)
  assert tokenizer.decode(row) == "The Golden is a pub."
  assert tokenizer.decode(row, show_mask=True) == f"The Golden{mask_text} is a pub."
  assert tokenizer.decode([tokenizers.PAD_ID, *left, tokenizers.PAD_ID]) == "The Golden"
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tokenizer.decode([tokenizer.vocab_size])


def test_decode_shows_control_characters_but_newline_and_tab_as_replacement_characters(embedded_tokenizers):
  """Byte-fallback tokens may hold control characters; a decoded sample never carries them raw."""
  sentencepiece = embedded_tokenizers["sentencepiece"]
  text = "a\x07\x1bb\n\tc\r\x7f\x85"
  assert sentencepiece.decode(sentencepiece.encode(text)) == "a\ufffd\ufffdb\n\tc\ufffd\ufffd\ufffd"
  char = tokenizers.CharTokenizer("a\x00\n")
  assert char.decode(char.encode("\x00a\n")) == "\ufffda\n"


def test_char_tokenizer_rejects_unknown_characters_by_name():
  tokenizer = tokenizers.CharTokenizer.train(["abc"])
  assert tokenizer.vocab_size == 4 + 3
  assert tokenizer.encode("cab") == [6, 4, 5]
  with pytest.raises(ValueError, match=r"character 'z' \(U\+007A\)"):
    tokenizer.encode("abz")


@pytest.mark.parametrize("kind", tokenizers.KINDS)
def test_encode_is_injective_on_embedded_corpus(kind, embedded_tokenizers, embedded_texts):
  tokenizer = embedded_tokenizers[kind]
  distinct_texts = set(embedded_texts)
  assert len(distinct_texts) > 2000
  assert len({tuple(tokenizer.encode(text)) for text in distinct_texts}) == len(distinct_texts)


@pytest.mark.parametrize("kind", tokenizers.KINDS)
def test_training_twice_gives_identical_files(kind, embedded_texts, tmp_path):
  for name in ("first", "second"):
    tokenizers.build_tokenizer(kind, embedded_texts[:1000], str(tmp_path / name), 400)
  for file in os.listdir(tmp_path / "first"):
    assert (tmp_path / "first" / file).read_bytes() == (tmp_path / "second" / file).read_bytes()


@pytest.mark.parametrize("kind", tokenizers.KINDS)
def test_save_then_load_gives_the_same_tokenizer(kind, embedded_tokenizers, embedded_texts,
                                                  tmp_path):
  tokenizer = embedded_tokenizers[kind]
  tokenizer.save(str(tmp_path))
  loaded = tokenizers.load_tokenizer(str(tmp_path))
  assert type(loaded) is type(tokenizer)
  assert loaded.vocab_size == tokenizer.vocab_size
  for text in embedded_texts[:300]:
    assert loaded.encode(text) == tokenizer.encode(text)
  assert [loaded.decode([i]) for i in range(loaded.vocab_size)] == [
      tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]


def test_build_tokenizer_loads_a_cached_tokenizer_instead_of_training(embedded_texts, tmp_path):
  built = tokenizers.build_tokenizer("sentencepiece", embedded_texts[:1000], str(tmp_path), 400)

  cached = tokenizers.build_tokenizer("sentencepiece", _Unreadable(), str(tmp_path), 400)
  assert cached.model_proto == built.model_proto
  with pytest.raises(ValueError, match="holds a 'sentencepiece' tokenizer trained for vocab_size "
                     "400, but a 'char' tokenizer was asked for"):
    tokenizers.build_tokenizer("char", embedded_texts, str(tmp_path))
  with pytest.raises(ValueError, match="but a 'sentencepiece' tokenizer trained for vocab_size 300"):
    tokenizers.build_tokenizer("sentencepiece", embedded_texts, str(tmp_path), 300)


def test_build_tokenizer_rejects_unknown_kinds(tmp_path):
  with pytest.raises(ValueError, match=r"unknown tokenizer kind 'bytes'.*'char', 'sentencepiece'"):
    tokenizers.build_tokenizer("bytes", ["abc"], str(tmp_path))
  assert not os.listdir(tmp_path)


def test_sentencepiece_vocabulary_is_capped_by_the_training_text(embedded_texts):
  tokenizer = tokenizers.SentencePieceTokenizer.train(embedded_texts[:300], 4000)
  assert tokenizer.requested_vocab_size == 4000
  assert 300 < tokenizer.vocab_size < 4000


def test_sentencepiece_learns_from_lines_longer_than_its_limit():
  # 'é' appears only inside a 12 kB line; sentencepiece alone drops lines over 4192 bytes, and
  # 'é' would then be spelled as two byte tokens.
  words = " ".join(f"w{i} v{7 * i}" for i in range(300))
  long_line = "é" + "xy zw " * 2000
  assert len(long_line.encode()) > tokenizers.SENTENCEPIECE_MAX_SENTENCE_BYTES
  tokenizer = tokenizers.SentencePieceTokenizer.train([words] * 10 + [long_line], 400)
  assert len(tokenizer.encode("é")) == 1


def test_split_long_texts_cuts_after_newlines_and_between_characters():
  texts = ["ab\n" * 10, "é" * 7, "short", ""]
  pieces = list(tokenizers.split_long_texts(texts, max_bytes=8))
  assert pieces == ["ab\nab\n", "ab\nab\n", "ab\nab\n", "ab\nab\n", "ab\nab\n",
                    "éééé", "ééé", "short"]


@pytest.mark.parametrize("kind", tokenizers.KINDS)
def test_char_counts_count_the_characters_of_any_run_of_ids(kind, embedded_tokenizers, embedded_texts):
  tokenizer = embedded_tokenizers[kind]
  unseen = "\u03a9 caf\u00e9 \u2615 \U0001f600" if kind == "sentencepiece" else ""  # Byte fallback.
  text = "  ".join(embedded_texts[:3]) + unseen
  counts_V = tokenizer.char_counts()
  assert counts_V.shape == (tokenizer.vocab_size,) and not counts_V[:len(tokenizers.SPECIAL_TOKENS)].any()
  ids = tokenizer.encode(text)
  assert counts_V[ids].sum() == len(text)
  # A cut anywhere splits the count between the parts, a cut character counted where it starts.
  for cut in range(len(ids) + 1):
    assert counts_V[ids[:cut]].sum() + counts_V[ids[cut:]].sum() == len(text)
  if kind == "sentencepiece":
    assert list(counts_V[tokenizer.encode("\u2615")]) == [1, 0, 0]


@pytest.mark.parametrize("kind", tokenizers.KINDS)
def test_encode_stream_encodes_a_long_text_in_pieces_cut_after_newlines(kind, embedded_tokenizers, embedded_texts,
                                                                        monkeypatch):
  monkeypatch.setattr(tokenizers, "STREAM_PIECE_BYTES", 200)
  tokenizer = {"char": tokenizers.CharTokenizer.train([*embedded_texts, "\n"]),
               "sentencepiece": embedded_tokenizers["sentencepiece"]}[kind]
  text = "\n".join(text for text in embedded_texts[:60] if len(text) < 150)  # Every line fits a piece.
  calls = []
  encode = tokenizer.encode
  monkeypatch.setattr(tokenizer, "encode", lambda piece: calls.append(piece) or encode(piece))
  stream_T = tokenizers.encode_stream(tokenizer, text)
  assert stream_T.dtype == np.int32 and tokenizer.decode(stream_T) == text
  assert len(calls) > 10 and all(len(piece.encode()) <= 200 for piece in calls)
  assert all(piece.endswith("\n") for piece in calls[:-1]) and "".join(calls) == text
  assert tokenizers.encode_stream(tokenizer, "").shape == (0,)
