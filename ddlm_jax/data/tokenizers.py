"""Character and sentencepiece tokenizers that share one set of special tokens.

Every tokenizer reserves the same four ids, so the diffusion processes and samplers can rely on
them whatever the vocabulary:

  [PAD]=0  [MASK]=1  [BOS]=2  [EOS]=3

`encode` never adds special tokens; `decode` reads a model's row: it stops at the first [EOS],
skips [PAD] and [BOS], drops [MASK] or shows it, and shows every control character but newline
and tab (a byte-fallback token may hold one) as U+FFFD, so that no sample can drive a terminal.
A tokenizer is trained on the texts it is given (`datasets` chooses them: every split for 'char',
the training split for 'sentencepiece') and saved next to the run, so a resumed run or a loaded
model uses the same vocabulary:

  tokenizer = build_tokenizer("sentencepiece", train_texts, f"{workdir}/tokenizer", 1024)
  ids = tokenizer.encode("The Golden Lantern is a pub.")
  assert tokenizer.decode(ids) == "The Golden Lantern is a pub."
"""
import abc
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import ClassVar

from absl import logging
import numpy as np
import sentencepiece as spm

SPECIAL_TOKENS = ("[PAD]", "[MASK]", "[BOS]", "[EOS]")
PAD_ID, MASK_ID, BOS_ID, EOS_ID = range(len(SPECIAL_TOKENS))
KINDS = ("char", "sentencepiece")

_METADATA_FILE = "tokenizer.json"
# What `decode` writes for each control character (C0, DEL, C1) other than newline and tab.
REPLACEMENT_CHARACTER = "\ufffd"
_CONTROL_CHARACTERS = {code: REPLACEMENT_CHARACTER for code in (*range(0x20), *range(0x7F, 0xA0))
                       if chr(code) not in "\n\t"}
# sentencepiece's trainer skips, with only a log line, any sentence longer than this many bytes.
SENTENCEPIECE_MAX_SENTENCE_BYTES = 4192
# `encode_stream` encodes a long text in pieces of at most this many UTF-8 bytes.
STREAM_PIECE_BYTES = 2**16


class Tokenizer(abc.ABC):
  """Maps text to ids >= len(SPECIAL_TOKENS) and model rows back to text."""

  kind: ClassVar[str]
  # How `decode(..., show_mask=True)` renders one [MASK] token.
  mask_text: ClassVar[str]
  pad_id: ClassVar[int] = PAD_ID
  mask_id: ClassVar[int] = MASK_ID
  bos_id: ClassVar[int] = BOS_ID
  eos_id: ClassVar[int] = EOS_ID

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids, special tokens included."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without special tokens."""

  @abc.abstractmethod
  def char_counts(self) -> np.ndarray:
    """int32[V]: characters of text that each id starts. A character id starts one; a
    sentencepiece piece starts its characters; a byte-fallback id starts one if it holds the first
    byte of a UTF-8 character, else none; special ids start none. So `char_counts()[ids].sum()`
    is the characters a row of text ids holds, however its ends cut the text."""

  @abc.abstractmethod
  def _decode_text_ids(self, ids: list[int]) -> str:
    """Text of ids that are all >= len(SPECIAL_TOKENS)."""

  @abc.abstractmethod
  def _save_state(self, directory: str) -> dict:
    """Writes the tokenizer's files; returns the metadata needed to load them."""

  def decode(self, ids: Sequence[int], *, show_mask: bool = False) -> str:
    """Text of a row of ids, up to its first [EOS]; [PAD] and [BOS] are skipped, and control
    characters other than newline and tab become U+FFFD.

    Args:
      ids: int[L] token ids, for example one row of a sample.
      show_mask: render each [MASK] as `mask_text` instead of dropping it.
    """
    parts, run = [], []
    for token in ids:
      token = int(token)
      if not 0 <= token < self.vocab_size:
        raise ValueError(f"token id {token} is outside the vocabulary [0, {self.vocab_size})")
      if token == EOS_ID:
        break
      if token == MASK_ID:
        parts.append(self._decode_text_ids(run))
        run = []
        if show_mask:
          parts.append(self.mask_text)
      elif token >= len(SPECIAL_TOKENS):
        run.append(token)
    parts.append(self._decode_text_ids(run))
    return "".join(parts).translate(_CONTROL_CHARACTERS)

  def save(self, directory: str) -> None:
    """Writes the tokenizer to `directory`; the metadata file is written last, atomically."""
    os.makedirs(directory, exist_ok=True)
    metadata = {"kind": self.kind, "vocab_size": self.vocab_size, **self._save_state(directory)}
    _write_atomically(os.path.join(directory, _METADATA_FILE),
                      json.dumps(metadata, indent=2).encode())


class CharTokenizer(Tokenizer):
  """One id per character of an alphabet taken from the texts it is trained on (text8-style)."""

  kind = "char"
  mask_text = "_"

  def __init__(self, alphabet: str):
    if not alphabet or len(set(alphabet)) != len(alphabet):
      raise ValueError(f"alphabet must be non-empty with distinct characters, got {alphabet!r}")
    self.alphabet = alphabet
    self._id_of_char = {char: index + len(SPECIAL_TOKENS) for index, char in enumerate(alphabet)}

  @classmethod
  def train(cls, texts: Iterable[str]) -> "CharTokenizer":
    """The tokenizer whose alphabet is the sorted set of characters in `texts`."""
    chars = set()
    for text in texts:
      chars.update(text)
    if not chars:
      raise ValueError("cannot build a character tokenizer from empty training text")
    return cls("".join(sorted(chars)))

  @property
  def vocab_size(self) -> int:
    return len(SPECIAL_TOKENS) + len(self.alphabet)

  def encode(self, text: str) -> list[int]:
    try:
      return [self._id_of_char[char] for char in text]
    except KeyError as error:
      char = error.args[0]
      raise ValueError(
          f"character {char!r} (U+{ord(char):04X}) is not in the tokenizer's alphabet, which was "
          "built from the texts it was trained on") from None

  def char_counts(self) -> np.ndarray:
    return np.array([0] * len(SPECIAL_TOKENS) + [1] * len(self.alphabet), np.int32)

  def _decode_text_ids(self, ids: list[int]) -> str:
    return "".join(self.alphabet[token - len(SPECIAL_TOKENS)] for token in ids)

  def _save_state(self, directory: str) -> dict:
    return {"alphabet": self.alphabet}


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model trained by `train`, with [MASK] as a control symbol at id 1.

  Normalisation is off and unseen characters fall back to bytes, so `decode(encode(text))`
  returns `text` exactly, whitespace and newlines included (control characters other than
  newline and tab come back as U+FFFD).

  Attributes:
    requested_vocab_size: the size asked of the trainer. `vocab_size` is smaller when the
      training text has too few distinct pieces (a small synthetic grammar, for example).
  """

  kind = "sentencepiece"
  mask_text = "[MASK]"
  _MODEL_FILE = "sentencepiece.model"

  def __init__(self, model_proto: bytes, requested_vocab_size: int):
    self.model_proto = model_proto
    self.requested_vocab_size = requested_vocab_size
    self._processor = spm.SentencePieceProcessor(model_proto=model_proto)
    special_ids = tuple(self._processor.piece_to_id(piece) for piece in SPECIAL_TOKENS)
    if special_ids != tuple(range(len(SPECIAL_TOKENS))):
      raise ValueError(f"sentencepiece model has special token ids {special_ids}, expected 0..3")

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, *,
            model_type: str = "bpe") -> "SentencePieceTokenizer":
    """Trains on every text, deterministically (one thread, no sampling of sentences).

    BPE is the default: on the embedded corpus with vocab_size=1024, unigram stopped at 713
    pieces plus the 256 byte-fallback ids and needed 58 tokens per document; BPE used all 1024
    ids and 42 tokens per document (33 with 2048 ids).

    Texts longer than sentencepiece's sentence limit are cut first, since its trainer would
    otherwise drop them. The result has at most `vocab_size` ids.
    """
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=split_long_texts(texts, SENTENCEPIECE_MAX_SENTENCE_BYTES),
          model_writer=model,
          model_type=model_type,
          vocab_size=vocab_size,
          pad_id=PAD_ID, pad_piece=SPECIAL_TOKENS[PAD_ID],
          bos_id=BOS_ID, bos_piece=SPECIAL_TOKENS[BOS_ID],
          eos_id=EOS_ID, eos_piece=SPECIAL_TOKENS[EOS_ID],
          unk_id=len(SPECIAL_TOKENS), unk_piece="[UNK]",
          control_symbols=[SPECIAL_TOKENS[MASK_ID]],
          byte_fallback=True,
          character_coverage=1.0,
          normalization_rule_name="identity",
          remove_extra_whitespaces=False,
          add_dummy_prefix=False,
          max_sentence_length=SENTENCEPIECE_MAX_SENTENCE_BYTES,
          input_sentence_size=0,
          num_threads=1,
          hard_vocab_limit=False,
          minloglevel=2,
      )
    except RuntimeError as error:
      raise ValueError(
          f"sentencepiece training with vocab_size={vocab_size} failed: {error}") from error
    tokenizer = cls(model.getvalue(), requested_vocab_size=vocab_size)
    if tokenizer.vocab_size < vocab_size:
      logging.warning("the training text supports only %d sentencepiece ids of the %d asked for",
                      tokenizer.vocab_size, vocab_size)
    return tokenizer

  @property
  def vocab_size(self) -> int:
    return self._processor.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self._processor.encode(text)

  def char_counts(self) -> np.ndarray:
    processor = self._processor
    counts = []
    for token in range(self.vocab_size):
      if processor.is_byte(token):
        counts.append(int(processor.id_to_piece(token)[3:5], 16) & 0b1100_0000 != 0b1000_0000)
      elif processor.is_control(token) or processor.is_unknown(token):
        counts.append(0)
      else:
        counts.append(len(processor.id_to_piece(token)))  # A space is one '\u2581' in a piece.
    return np.array(counts, np.int32)

  def _decode_text_ids(self, ids: list[int]) -> str:
    return self._processor.decode(ids)

  def _save_state(self, directory: str) -> dict:
    _write_atomically(os.path.join(directory, self._MODEL_FILE), self.model_proto)
    return {"model_file": self._MODEL_FILE, "requested_vocab_size": self.requested_vocab_size}


def split_long_texts(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
  """Yields each text, cut into pieces of at most `max_bytes` UTF-8 bytes where needed.

  A cut falls just after the last newline within reach, else at the last character boundary.
  """
  for text in texts:
    data = text.encode()
    start = 0
    while len(data) - start > max_bytes:
      end = start + max_bytes
      while data[end] & 0b1100_0000 == 0b1000_0000:  # A UTF-8 continuation byte.
        end -= 1
      end = data.rfind(b"\n", start, end) + 1 or end
      yield data[start:end].decode()
      start = end
    if start < len(data):
      yield data[start:].decode()


def encode_stream(tokenizer: Tokenizer, text: str) -> np.ndarray:
  """int32[T]: the ids of a long text, without special tokens, encoded piece by piece.

  The pieces are those of `split_long_texts` with STREAM_PIECE_BYTES (cut after a newline where
  one is within reach), so a text of many megabytes never goes to sentencepiece in one call;
  `tokenizer.decode` of the result gives the text back.
  """
  pieces = [np.asarray(tokenizer.encode(piece), np.int32)
            for piece in split_long_texts([text], STREAM_PIECE_BYTES)]
  return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)


def build_tokenizer(kind: str, train_texts: Iterable[str], directory: str,
                    vocab_size: int | None = None) -> Tokenizer:
  """Loads the tokenizer saved in `directory`, or trains one on `train_texts` and saves it there.

  Args:
    kind: 'char' or 'sentencepiece'.
    train_texts: the texts to train on; only read when a tokenizer is trained.
    directory: where the tokenizer is cached.
    vocab_size: number of ids, special tokens included, asked of 'sentencepiece' (required;
      the result may be smaller, see `SentencePieceTokenizer`); ignored by 'char', whose
      vocabulary is the alphabet of `train_texts`.

  Raises:
    ValueError: for an unknown kind, or when `directory` holds a tokenizer of another kind or
      vocabulary size (a run's checkpoints depend on it, so it is never replaced).
  """
  if kind not in KINDS:
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")
  if kind == "sentencepiece" and (vocab_size is None or vocab_size <= 0):
    raise ValueError(f"sentencepiece needs a positive vocab_size, got {vocab_size}")
  if os.path.exists(os.path.join(directory, _METADATA_FILE)):
    tokenizer = load_tokenizer(directory)
    saved = _describe(tokenizer.kind, getattr(tokenizer, "requested_vocab_size", None))
    if saved != _describe(kind, vocab_size):
      raise ValueError(f"{directory} already holds {saved}, but {_describe(kind, vocab_size)} "
                       "was asked for; use a fresh directory")
    return tokenizer
  if kind == "char":
    tokenizer = CharTokenizer.train(train_texts)
  else:
    tokenizer = SentencePieceTokenizer.train(train_texts, vocab_size)
  tokenizer.save(directory)
  return tokenizer


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
  """Whether two tokenizers map every text to the same ids (the same kind and alphabet or model)."""
  return (a.kind, getattr(a, "alphabet", None), getattr(a, "model_proto", None)) == (
      b.kind, getattr(b, "alphabet", None), getattr(b, "model_proto", None))


def load_tokenizer(directory: str) -> Tokenizer:
  """The tokenizer that `Tokenizer.save` wrote to `directory`."""
  metadata_path = os.path.join(directory, _METADATA_FILE)
  if not os.path.exists(metadata_path):
    raise ValueError(f"no saved tokenizer in {directory} ({_METADATA_FILE} is missing)")
  with open(metadata_path) as file:
    metadata = json.load(file)
  if metadata["kind"] == "char":
    return CharTokenizer(metadata["alphabet"])
  if metadata["kind"] == "sentencepiece":
    with open(os.path.join(directory, metadata["model_file"]), "rb") as file:
      return SentencePieceTokenizer(file.read(), metadata["requested_vocab_size"])
  raise ValueError(f"{metadata_path} names unknown tokenizer kind {metadata['kind']!r}")


def _describe(kind: str, vocab_size: int | None) -> str:
  """The settings that identify a built tokenizer, in words."""
  if kind == "char":
    return "a 'char' tokenizer"
  return f"a {kind!r} tokenizer trained for vocab_size {vocab_size}"


def _write_atomically(path: str, data: bytes) -> None:
  """Writes `data` to `path` so that readers see the old file or the whole new one."""
  temporary = f"{path}.tmp.{os.getpid()}"
  with open(temporary, "wb") as file:
    file.write(data)
  os.replace(temporary, path)
