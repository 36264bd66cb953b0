"""One call from a data config to token rows: texts, tokenizer, layout.

  config = DataConfig(source="embedded", seq_len=128)
  data = load_data(config, workdir)
  batches = train_batches(data, config, batch_size=64, seed=0, process_index=0, process_count=1)

Sources:
  'embedded':   the project's synthetic restaurant corpus (no files, no network); evaluation texts
                come with their exact log-probability under the generator.
  'text_files': local UTF-8 files through the `LocalText` TFDS builder, cached in workdir/tfds.
  'tfds':       a TFDS catalog dataset by name (`tfds_name`), read from `tfds_data_dir` (default:
                $TFDS_DATA_DIR or ~/tensorflow_datasets) and downloaded there if missing, which
                needs network access.

Units (`local_text.UNITS`): 'paragraph' and 'line' cut texts into documents; 'stream' (for
'text_files' and 'tfds', with packing='pack') takes no documents at all, text8/enwik8-style: the
text is one stream of characters and every character, newline included, is a token (no [EOS] is
inserted). For 'text_files' the held-out part is the last `validation_fraction` of the characters;
for 'tfds' the stream of a split is its examples joined by newlines. num_train_docs and
num_eval_docs do not limit a stream.

Rows: packing='pad' puts one document in a row. packing='pack' makes the training stream
(`DataBundle.train_stream`: documents each followed by [EOS], or the bare stream) and cuts it into
rows; the held-out stream is cut the same way into consecutive, non-overlapping windows of seq_len
(the tail shorter than a window is dropped), so each evaluation row holds only text tokens and
[EOS] (no [PAD]). `train_batches` draws training batches from the rows or, with
train_windows='random', from contiguous windows of the training stream.

Tasks:
  'lm':           language modelling: each row holds documents alone.
  'data_to_text': each row is a pair [source..., EOS, target..., EOS, PAD, ...] (the layout of
                  `pairs.py`): an embedded document's serialised record
                  (`corpus.format_record`), then its text.
  'text_to_data': the same pair the other way round: the text, then the record.
  'instructions': both directions in an instruction format (LLaDA-style SFT): even-numbered
                  documents ask for the description of their record, odd-numbered ones for the
                  record of their text, each source led by its instruction (INSTRUCTIONS).
  'completion':   each document's text cut in two at its middle word (`pairs.split_in_halves`):
                  even-numbered documents ask for the half after the given one, odd-numbered ones
                  for the half before it, each source led by its instruction (INSTRUCTIONS); the
                  format of the reversal evaluation (`reversal.py`).

Tokenizers: the 'char' alphabet comes from the whole text, every split (training and held-out;
both sides of the pairs of a pair task), as the text8/enwik8 protocols do, so held-out text is
never dropped or refused for a character seen only there. For local files that is every document
of both splits, whatever num_train_docs and num_eval_docs read; for the embedded corpus and
catalog documents, every text read. 'sentencepiece' is trained on the training split only (for a
pair task, on both sides of the training pairs); characters it never saw fall back to bytes.
The tokenizer is cached in workdir/tokenizer with the `texts_fingerprint` of the data it was
trained on; data with another fingerprint (other settings, or an edited text file) is refused there.
"""
import dataclasses
import functools
import hashlib
import json
import os

from absl import logging
import numpy as np

from ddlm_jax.data import batching
from ddlm_jax.data import corpus
from ddlm_jax.data import local_text
from ddlm_jax.data import pairs as pairs_lib
from ddlm_jax.data import tokenizers

SOURCES = ("embedded", "text_files", "tfds")
PACKINGS = ("pad", "pack")
TRAIN_WINDOWS = ("rows", "random")
TASKS = ("lm", "data_to_text", "text_to_data", "instructions", "completion")
# The instruction of each direction of tasks 'instructions' and 'completion', before the source it asks about.
INSTRUCTIONS = {"data_to_text": "Describe the restaurant with these facts: ",
                "text_to_data": "List the facts of this description: ",
                "forward": "Write what follows: ",
                "reversal": "Write what comes before: "}
# The directions of each instruction task, taken by documents in turn.
INSTRUCTION_DIRECTIONS = {"instructions": ("data_to_text", "text_to_data"), "completion": ("forward", "reversal")}
# The settings that choose the texts (and so the tokenizer's training texts); `texts_fingerprint` adds the
# content of local files. The held-out settings that the char alphabet also reads are left out so that
# older runs keep their fingerprint; a resumed run's `config.run_identity` compares every data setting.
TEXT_SETTINGS = ("source", "tfds_name", "unit", "num_train_docs", "validation_fraction", "seed", "task",
                 "record_attributes")
TOKENIZER_FINGERPRINT_FILE = "texts_fingerprint.json"
# Sentencepiece's smallest vocabulary: the special tokens, [UNK], a byte-fallback id per byte value
# and at least one character of the text (it needs one id per distinct character).
MIN_SENTENCEPIECE_VOCAB_SIZE = len(tokenizers.SPECIAL_TOKENS) + 1 + 256 + 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the text comes from and how it becomes rows.

  Attributes:
    source: 'embedded', 'text_files' or 'tfds'.
    paths: local text files for 'text_files' (a single string counts as one path).
    tfds_name: catalog name for 'tfds', for example 'lm1b' or 'tiny_shakespeare'.
    tfds_eval_split: the catalog split used for evaluation ('test' for lm1b).
    tfds_data_dir: TFDS data directory for 'tfds'; empty for TFDS's default.
    unit: how files and catalog texts are cut into documents: 'paragraph' or 'line'; or 'stream'
      for no documents, the text as one stream of characters (needs packing='pack', and source
      'text_files' or 'tfds').
    tokenizer: 'char' or 'sentencepiece'.
    vocab_size: sentencepiece vocabulary size, special tokens included (unused by 'char').
    seq_len: tokens per row, L.
    packing: 'pad' (one document per row) or 'pack' (documents concatenated and cut).
    train_windows: how training rows are drawn: 'rows' (the fixed rows of the layout, reshuffled
      every epoch) or 'random' (contiguous windows of the packed training stream at offsets drawn
      afresh for every batch; packing='pack' only).
    num_train_docs: documents sampled ('embedded') or read at most ('text_files', 'tfds'); a
      stream is never limited.
    num_eval_docs: the same, for evaluation.
    validation_fraction: share of local documents ('text_files'), or of the characters for unit
      'stream', held out for evaluation.
    seed: seeds the embedded corpus's samples.
    task: 'lm', 'data_to_text', 'text_to_data', 'instructions' or 'completion'; the pair tasks need
      source='embedded' and packing='pad'.
    record_attributes: the attributes a pair's serialised record holds, of those the document
      mentions; empty for all of them (pair tasks only).
  """
  source: str = "embedded"
  paths: tuple[str, ...] = ()
  tfds_name: str = ""
  tfds_eval_split: str = "validation"
  tfds_data_dir: str = ""
  unit: str = "paragraph"
  tokenizer: str = "sentencepiece"
  vocab_size: int = 1024
  seq_len: int = 128
  packing: str = "pad"
  train_windows: str = "rows"
  num_train_docs: int = 50_000
  num_eval_docs: int = 1_000
  validation_fraction: float = 0.05
  seed: int = 0
  task: str = "lm"
  record_attributes: tuple[str, ...] = ()

  def __post_init__(self):
    for field in ("paths", "record_attributes"):  # Hashable, whatever sequence was given.
      value = getattr(self, field)
      object.__setattr__(self, field, (value,) if isinstance(value, str) else tuple(value))
    for field, allowed in (("source", SOURCES), ("tokenizer", tokenizers.KINDS),
                           ("packing", PACKINGS), ("unit", local_text.UNITS), ("task", TASKS),
                           ("train_windows", TRAIN_WINDOWS)):
      if getattr(self, field) not in allowed:
        raise ValueError(f"DataConfig.{field} is {getattr(self, field)!r}; expected one of "
                         f"{allowed}")
    for field in ("vocab_size", "num_train_docs", "num_eval_docs"):
      if getattr(self, field) <= 0:
        raise ValueError(f"DataConfig.{field} must be positive, got {getattr(self, field)}")
    if self.tokenizer == "sentencepiece" and self.vocab_size < MIN_SENTENCEPIECE_VOCAB_SIZE:
      raise ValueError(f"DataConfig.vocab_size must be at least {MIN_SENTENCEPIECE_VOCAB_SIZE} for sentencepiece "
                       f"(its {len(tokenizers.SPECIAL_TOKENS) + 1} special ids, 256 byte ids and the text's "
                       f"characters), got {self.vocab_size}")
    if self.seed < 0:
      raise ValueError(f"DataConfig.seed must be >= 0, got {self.seed}")
    if self.seq_len < 2:
      raise ValueError(f"DataConfig.seq_len must be at least 2, got {self.seq_len}")
    if not 0 < self.validation_fraction < 1:
      raise ValueError(f"DataConfig.validation_fraction must be in (0, 1), got "
                       f"{self.validation_fraction}")
    if self.source == "text_files" and not self.paths:
      raise ValueError("DataConfig.paths must name at least one file for source='text_files'")
    if self.source == "tfds" and not self.tfds_name:
      raise ValueError("DataConfig.tfds_name must be set for source='tfds'")
    if self.unit == "stream" and self.source == "embedded":
      raise ValueError("DataConfig.unit='stream' reads the text of files or of a TFDS dataset: it needs "
                       "source='text_files' or 'tfds', not 'embedded'")
    if self.unit == "stream" and self.packing != "pack":
      raise ValueError(f"DataConfig.unit='stream' has no documents to put one per row: it needs "
                       f"packing='pack', not {self.packing!r}")
    if self.train_windows == "random" and self.packing != "pack":
      raise ValueError("DataConfig.train_windows='random' draws windows of a packed stream: it needs packing='pack'")
    if self.task != "lm" and (self.source, self.packing) != ("embedded", "pad"):
      raise ValueError(f"DataConfig.task={self.task!r} needs source='embedded' and packing='pad', "
                       f"got source={self.source!r} and packing={self.packing!r}")
    if self.task == "lm" and self.record_attributes:
      raise ValueError("DataConfig.record_attributes applies to the pair tasks only, not task='lm'")
    if (set(self.record_attributes) - set(corpus.ATTRIBUTES)
        or len(set(self.record_attributes)) != len(self.record_attributes)):
      raise ValueError(f"DataConfig.record_attributes must be distinct names from "
                       f"{corpus.ATTRIBUTES}, got {self.record_attributes}")


@dataclasses.dataclass(frozen=True, eq=False)
class DataBundle:
  """Everything training and evaluation need from the data.

  For a pair task the scored text of a row is its target: eval_texts, eval_num_tokens and
  eval_num_chars describe the targets.

  Attributes:
    tokenizer: see the module docstring for the texts it was trained on.
    train_rows: int32[N, L]; with packing='pack', a view of `train_stream` cut into consecutive rows.
    eval_rows: int32[M, L]; with packing='pack', the held-out stream cut into consecutive,
      non-overlapping windows (the tail shorter than L dropped).
    eval_texts: the evaluation documents (pair targets); row i holds text i in 'pad' mode. For unit
      'stream', one text: the whole held-out part, which the rows hold from its start.
    eval_log_probs: float64[M], exact natural-log p(text) of each evaluation row's text under
      the generator (NaN where the row was cut short): embedded corpus in 'pad' mode and task
      'lm' only, else None.
    eval_num_tokens: int32[M], text tokens in each evaluation row (EOS and PAD excluded, so every
      token of a 'stream' row; for pairs, those of the target only).
    eval_num_chars: int32[M], characters of the original text each evaluation row holds (for bits
      per character; L in a 'stream' row of the char tokenizer; `Tokenizer.char_counts`).
    num_truncated: documents or pairs, training and evaluation, cut short to fit a row ('pad' mode).
    eval_sources: the evaluation pairs' sources; None for task 'lm'.
    eval_targets: the evaluation pairs' targets, whole; None for task 'lm'.
    eval_records: the evaluation documents' full records (for attribute accuracy); None for 'lm'.
    train_stream: int32[T], the packed training token stream (documents each followed by [EOS],
      or the bare text tokens for 'stream'); None for packing='pad'.
  """
  tokenizer: tokenizers.Tokenizer
  train_rows: np.ndarray
  eval_rows: np.ndarray
  eval_texts: tuple[str, ...]
  eval_log_probs: np.ndarray | None
  eval_num_tokens: np.ndarray
  eval_num_chars: np.ndarray
  num_truncated: int
  eval_sources: tuple[str, ...] | None = None
  eval_targets: tuple[str, ...] | None = None
  eval_records: tuple[dict[str, str], ...] | None = None
  train_stream: np.ndarray | None = None


def texts_fingerprint(config: DataConfig) -> str:
  """A digest of the texts a config chooses: its TEXT_SETTINGS and, for 'text_files', the content of
  the files (so an edited file changes it; a missing one raises ValueError naming it). Catalog
  datasets are taken as named (TFDS versions them)."""
  digest = hashlib.sha256(json.dumps({name: getattr(config, name) for name in TEXT_SETTINGS}).encode())
  for path in config.paths if config.source == "text_files" else ():
    digest.update(hashlib.sha256(local_text.read_text_file(path).encode()).digest())
  return digest.hexdigest()[:16]


def check_tokenizer_texts(directory: str, fingerprint: str) -> None:
  """Raises ValueError, before anything is written, if the tokenizer cached in `directory` was
  trained on texts of another fingerprint (one cached before fingerprints were kept is accepted)."""
  path = os.path.join(directory, TOKENIZER_FINGERPRINT_FILE)
  if not os.path.exists(path):
    return
  with open(path) as file:
    trained_on = json.load(file)["texts_fingerprint"]
  if trained_on != fingerprint:
    raise ValueError(f"the tokenizer in {directory} was trained on other texts (fingerprint {trained_on}, "
                     f"now {fingerprint}): the data settings or the text files changed since. Use a new "
                     "--workdir, or the data it was trained on; the workdir was left as it is.")


def _build_tokenizer(config: DataConfig, train_texts: list[str], alphabet_texts: list[str], workdir: str,
                     fingerprint: str, adopted: tokenizers.Tokenizer | None = None) -> tokenizers.Tokenizer:
  """The workdir's tokenizer; one made now is saved with the texts' fingerprint. 'char' takes its
  alphabet from `alphabet_texts` (every text of every split), 'sentencepiece' is trained on
  `train_texts` (the training texts the config reads) alone. An `adopted` tokenizer (another run's)
  is used instead of a new one: it must be the one the workdir already holds, if any, and a char
  alphabet must cover every character of `alphabet_texts`."""
  directory = os.path.join(workdir, "tokenizer")
  made_now = not os.path.isdir(directory)
  if adopted is None:
    texts = train_texts if config.tokenizer == "sentencepiece" else alphabet_texts
    tokenizer = tokenizers.build_tokenizer(config.tokenizer, texts, directory, config.vocab_size)
  else:
    tokenizer = _adopt(adopted, alphabet_texts, directory)
  if made_now:
    path = os.path.join(directory, TOKENIZER_FINGERPRINT_FILE)
    with open(path + ".tmp", "w") as file:
      json.dump({"texts_fingerprint": fingerprint}, file)
    os.replace(path + ".tmp", path)
  return tokenizer


def _adopt(tokenizer: tokenizers.Tokenizer, texts: list[str], directory: str) -> tokenizers.Tokenizer:
  """`tokenizer`, saved in `directory` unless that holds it already; a ValueError, before anything is
  written, when `directory` holds another one or a char alphabet misses a character of `texts`."""
  if os.path.isdir(directory):
    if not tokenizers.same_tokenizer(tokenizers.load_tokenizer(directory), tokenizer):
      raise ValueError(f"{directory} holds another tokenizer than the one of config.init_from; use a new --workdir")
    return tokenizer
  if tokenizer.kind == "char":
    missing = sorted(set().union(*map(set, texts)) - set(tokenizer.alphabet))
    if missing:
      raise ValueError(f"the char tokenizer of config.init_from has no id for {len(missing)} character(s) of "
                       f"these texts ({''.join(missing[:20])!r}): start from a run whose alphabet covers them")
  tokenizer.save(directory)
  return tokenizer


def load_data(config: DataConfig, workdir: str, tokenizer: tokenizers.Tokenizer | None = None) -> DataBundle:
  """Reads the texts, builds (or loads) the tokenizer and lays the documents out in rows.

  `tokenizer`: another run's tokenizer to adopt instead of making one (`config.init_from`); it is
  saved as the workdir's.

  Raises ValueError before anything is written if workdir/tokenizer was trained on other texts, and
  with packing='pack' if the held-out stream is shorter than one row; before the tokenizer is written
  if it is not the adopted one or an adopted char alphabet misses a character of the texts.
  """
  fingerprint = texts_fingerprint(config)
  check_tokenizer_texts(os.path.join(workdir, "tokenizer"), fingerprint)
  if config.task != "lm":
    return _load_pairs(config, workdir, fingerprint, tokenizer)
  texts = _load_texts(config, workdir)
  tokenizer = _build_tokenizer(config, texts.train, texts.every_train + texts.every_held_out, workdir, fingerprint,
                               tokenizer)
  train_stream = eval_stream = None
  if config.unit == "stream":
    (train_text,), (eval_text,) = texts.train, texts.held_out
    train_stream = tokenizers.encode_stream(tokenizer, train_text)
    eval_stream = tokenizers.encode_stream(tokenizer, eval_text)
  else:
    train_docs = [tokenizer.encode(text) for text in texts.train]
    eval_docs = [tokenizer.encode(text) for text in texts.held_out]
    if config.packing == "pack":
      train_stream = batching.pack_stream(train_docs, eos_id=tokenizer.eos_id)
      eval_stream = batching.pack_stream(eval_docs, eos_id=tokenizer.eos_id)
  if config.packing == "pack":
    train_rows = batching.cut_rows(train_stream, config.seq_len)
    eval_rows = _held_out_windows(eval_stream, config)
    eval_log_probs, num_truncated = None, 0
  else:
    pad = functools.partial(batching.pad_documents, seq_len=config.seq_len, eos_id=tokenizer.eos_id,
                            pad_id=tokenizer.pad_id)
    train_rows, eval_rows = pad(train_docs), pad(eval_docs)
    num_eval_truncated = batching.count_truncated(eval_docs, config.seq_len)
    num_truncated = batching.count_truncated(train_docs, config.seq_len) + num_eval_truncated
    if num_eval_truncated:
      logging.warning("%d of %d evaluation documents are longer than seq_len=%d and were cut; "
                      "their rows do not hold the whole text and have no exact log-probability",
                      num_eval_truncated, len(eval_docs), config.seq_len)
    eval_log_probs = texts.held_out_log_probs
    if eval_log_probs is not None:
      cut = np.array([len(doc) > config.seq_len - 1 for doc in eval_docs], bool)
      eval_log_probs = np.where(cut, np.nan, eval_log_probs)
  eval_num_tokens = np.sum((eval_rows != tokenizer.eos_id) & (eval_rows != tokenizer.pad_id),
                           axis=1, dtype=np.int32)
  return DataBundle(tokenizer=tokenizer, train_rows=train_rows, eval_rows=eval_rows,
                    eval_texts=tuple(texts.held_out), eval_log_probs=eval_log_probs,
                    eval_num_tokens=eval_num_tokens,
                    eval_num_chars=np.sum(tokenizer.char_counts()[eval_rows], axis=1, dtype=np.int32),
                    num_truncated=num_truncated, train_stream=train_stream)


def train_batches(data: DataBundle, config: DataConfig, batch_size: int, seed: int, *,
                  process_index: int, process_count: int) -> batching.BatchIterator | batching.WindowIterator:
  """The training batches the config asks for: shuffled epochs of `data.train_rows` for
  train_windows='rows', random contiguous windows of `data.train_stream` for 'random'."""
  processes = dict(process_index=process_index, process_count=process_count)
  if config.train_windows == "random":
    return batching.WindowIterator(data.train_stream, config.seq_len, batch_size, seed, **processes)
  return batching.BatchIterator(data.train_rows, batch_size, seed, **processes)


def _held_out_windows(stream_T: np.ndarray, config: DataConfig) -> np.ndarray:
  """int32[M, L]: the held-out stream cut into consecutive windows; a ValueError if there is none."""
  if len(stream_T) < config.seq_len:
    raise ValueError(f"the held-out part has {len(stream_T)} tokens, fewer than one row of DataConfig.seq_len="
                     f"{config.seq_len}: raise DataConfig.validation_fraction (or num_eval_docs for "
                     "documents) or lower DataConfig.seq_len")
  return batching.cut_rows(stream_T, config.seq_len)


def _load_pairs(config: DataConfig, workdir: str, fingerprint: str,
                adopted: tokenizers.Tokenizer | None) -> DataBundle:
  """`load_data` for a pair task: rows [source..., EOS, target..., EOS, PAD, ...].

  A pair too long for a row loses the end of its target, as `batching.pad_documents` cuts it.
  """
  train, evaluation = _embedded_documents(config)
  train_pairs = [_pair(document, index, config) for index, document in enumerate(train)]
  eval_pairs = [_pair(document, index, config) for index, document in enumerate(evaluation)]
  train_sides = [side for pair in train_pairs for side in pair]
  tokenizer = _build_tokenizer(config, train_sides, train_sides + [side for pair in eval_pairs for side in pair],
                               workdir, fingerprint, adopted)
  train_docs = _encode_pairs(train_pairs, tokenizer, config.seq_len)
  eval_docs = _encode_pairs(eval_pairs, tokenizer, config.seq_len)
  num_eval_truncated = batching.count_truncated(eval_docs, config.seq_len)
  if num_eval_truncated:
    logging.warning("%d of %d evaluation pairs are longer than seq_len=%d; their targets were cut",
                    num_eval_truncated, len(eval_docs), config.seq_len)
  pad = functools.partial(batching.pad_documents, seq_len=config.seq_len, eos_id=tokenizer.eos_id,
                          pad_id=tokenizer.pad_id)
  eval_rows = pad(eval_docs)
  target_ML = ~pairs_lib.source_mask(eval_rows, tokenizer.eos_id)
  target_text_ML = target_ML & (eval_rows != tokenizer.eos_id) & (eval_rows != tokenizer.pad_id)
  eval_targets = tuple(target for _, target in eval_pairs)
  return DataBundle(
      tokenizer=tokenizer, train_rows=pad(train_docs), eval_rows=eval_rows,
      eval_texts=eval_targets, eval_log_probs=None,
      eval_num_tokens=np.sum(target_text_ML, axis=1, dtype=np.int32),
      eval_num_chars=np.array([len(tokenizer.decode(row[target]))
                               for row, target in zip(eval_rows, target_ML)], np.int32),
      num_truncated=batching.count_truncated(train_docs, config.seq_len) + num_eval_truncated,
      eval_sources=tuple(source for source, _ in eval_pairs), eval_targets=eval_targets,
      eval_records=tuple(dict(document.record) for document in evaluation))


def _pair(document: corpus.Document, index: int, config: DataConfig) -> tuple[str, str]:
  """(source, target) of the `index`-th document of a split for the config's pair task."""
  directions = INSTRUCTION_DIRECTIONS.get(config.task)
  direction = directions[index % 2] if directions else config.task
  if direction in ("forward", "reversal"):
    before, after = pairs_lib.split_in_halves(document.text)
    source, target = (before, after) if direction == "forward" else (after, before)
  else:
    record = corpus.format_record(document.record, config.record_attributes)
    source, target = (record, document.text) if direction == "data_to_text" else (document.text, record)
  return (INSTRUCTIONS[direction] + source, target) if directions else (source, target)


def _encode_pairs(pairs: list[tuple[str, str]], tokenizer: tokenizers.Tokenizer,
                  seq_len: int) -> list[list[int]]:
  """Each pair as one document, source + [EOS] + target, after checking every source fits a row."""
  sources = [tokenizer.encode(source) for source, _ in pairs]
  longest = max(map(len, sources), default=0)
  if longest + 2 > seq_len:  # The source, its [EOS] and the target's [EOS].
    raise ValueError(f"a source of {longest} tokens does not fit in a row of seq_len={seq_len}: "
                     f"raise DataConfig.seq_len to at least {longest + 2}")
  return [pairs_lib.encode_pair(source, tokenizer.encode(target), tokenizer.eos_id)
          for source, (_, target) in zip(sources, pairs)]


@dataclasses.dataclass(frozen=True)
class _Texts:
  """The texts of a language-modelling config.

  Attributes:
    train: the training documents; for unit 'stream', the training text as one string.
    held_out: the evaluation documents; for unit 'stream', the held-out text as one string.
    held_out_log_probs: float64[M], their exact log-probabilities (embedded corpus), else None.
    every_train, every_held_out: every text of each split, whatever num_train_docs and
      num_eval_docs keep of a local file's (the char alphabet's source).
  """
  train: list[str]
  held_out: list[str]
  held_out_log_probs: np.ndarray | None
  every_train: list[str]
  every_held_out: list[str]


def _load_texts(config: DataConfig, workdir: str) -> _Texts:
  """The training and held-out texts of a language-modelling config."""
  if config.source == "embedded":
    train, evaluation = _embedded_documents(config)
    train_texts, eval_texts = [doc.text for doc in train], [doc.text for doc in evaluation]
    return _Texts(train_texts, eval_texts, np.array([doc.log_prob for doc in evaluation], np.float64),
                  train_texts, eval_texts)
  if config.source == "text_files":
    load = functools.partial(local_text.load_local_texts, config.paths, os.path.join(workdir, "tfds"),
                             unit=config.unit, validation_fraction=config.validation_fraction)
    train_texts, eval_texts = load("train"), load("validation")
    if config.unit == "stream":
      train_texts, eval_texts = ["".join(train_texts)], ["".join(eval_texts)]
      return _Texts(train_texts, eval_texts, None, train_texts, eval_texts)
    return _Texts(train_texts[:config.num_train_docs], eval_texts[:config.num_eval_docs], None,
                  train_texts, eval_texts)
  if config.unit == "stream":
    train_texts, eval_texts = (["\n".join(local_text.load_catalog_texts(
        config.tfds_name, split, data_dir=config.tfds_data_dir or None))]
                               for split in ("train", config.tfds_eval_split))
    return _Texts(train_texts, eval_texts, None, train_texts, eval_texts)
  train_texts = _catalog_documents(config, "train", config.num_train_docs)
  eval_texts = _catalog_documents(config, config.tfds_eval_split, config.num_eval_docs)
  return _Texts(train_texts, eval_texts, None, train_texts, eval_texts)


def _embedded_documents(config: DataConfig) -> tuple[list[corpus.Document], list[corpus.Document]]:
  """The embedded corpus's training and evaluation documents."""
  generator = corpus.default_corpus()
  return (generator.sample(config.num_train_docs, corpus.split_seed("train", config.seed)),
          generator.sample(config.num_eval_docs, corpus.split_seed("validation", config.seed)))


def _catalog_documents(config: DataConfig, split: str, limit: int) -> list[str]:
  """The first `limit` documents of a catalog split, each example cut into `config.unit`s.

  Cutting matters for datasets that store a whole corpus in one example (tiny_shakespeare).
  """
  documents = []
  for text in local_text.load_catalog_texts(config.tfds_name, split,
                                            data_dir=config.tfds_data_dir or None,
                                            max_texts=limit):
    documents += local_text.split_documents(text, config.unit)
  return documents[:limit]
