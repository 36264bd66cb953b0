"""One call from a data config to token rows: texts, tokenizer, layout.

  data = load_data(DataConfig(source="embedded", seq_len=128), workdir)
  batches = batching.BatchIterator(data.train_rows, batch_size=64, seed=0)

Sources:
  'embedded':   the project's synthetic restaurant corpus (no files, no network); evaluation texts
                come with their exact log-probability under the generator.
  'text_files': local UTF-8 files through the `LocalText` TFDS builder, cached in workdir/tfds.
  'tfds':       a TFDS catalog dataset by name (`tfds_name`), read from `tfds_data_dir` (default:
                $TFDS_DATA_DIR or ~/tensorflow_datasets) and downloaded there if missing, which
                needs network access.

Tasks:
  'lm':           language modelling: each row holds documents alone.
  'data_to_text': each row is a pair [source..., EOS, target..., EOS, PAD, ...] (the layout of
                  `pairs.py`): an embedded document's serialised record
                  (`corpus.format_record`), then its text.
  'text_to_data': the same pair the other way round: the text, then the record.

The tokenizer is trained on the training split only (for a pair task, on both sides of the
training pairs) and cached in workdir/tokenizer with the `texts_fingerprint` of the data it was
trained on; data with another fingerprint (other settings, or an edited text file) is refused there.
"""
import dataclasses
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
TASKS = ("lm", "data_to_text", "text_to_data")
# The settings that choose the texts (and so the tokenizer's training texts); `texts_fingerprint`
# adds the content of local files.
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
    unit: how files and catalog texts are cut into documents: 'paragraph' or 'line'.
    tokenizer: 'char' or 'sentencepiece'.
    vocab_size: sentencepiece vocabulary size, special tokens included (unused by 'char').
    seq_len: tokens per row, L.
    packing: 'pad' (one document per row) or 'pack' (documents concatenated and cut).
    num_train_docs: documents sampled ('embedded') or read at most ('text_files', 'tfds').
    num_eval_docs: the same, for evaluation.
    validation_fraction: share of local documents held out for evaluation ('text_files').
    seed: seeds the embedded corpus's samples.
    task: 'lm', 'data_to_text' or 'text_to_data'; the pair tasks need source='embedded' and
      packing='pad'.
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
                           ("packing", PACKINGS), ("unit", local_text.UNITS), ("task", TASKS)):
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
    tokenizer: trained on the training texts (both sides of the training pairs).
    train_rows: int32[N, L].
    eval_rows: int32[M, L].
    eval_texts: the evaluation documents (pair targets); row i holds text i in 'pad' mode.
    eval_log_probs: float64[M], exact natural-log p(text) of each evaluation row's text under
      the generator (NaN where the row was cut short): embedded corpus in 'pad' mode and task
      'lm' only, else None.
    eval_num_tokens: int32[M], text tokens in each evaluation row (EOS and PAD excluded; for
      pairs, those of the target only).
    eval_num_chars: int32[M], characters of the text each evaluation row holds (for bits per
      character; exact for the char tokenizer, up to word-boundary spaces at cuts for sentencepiece).
    num_truncated: documents or pairs, training and evaluation, cut short to fit a row ('pad' mode).
    eval_sources: the evaluation pairs' sources; None for task 'lm'.
    eval_targets: the evaluation pairs' targets, whole; None for task 'lm'.
    eval_records: the evaluation documents' full records (for attribute accuracy); None for 'lm'.
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


def _build_tokenizer(config: DataConfig, train_texts: list[str], workdir: str,
                     fingerprint: str) -> tokenizers.Tokenizer:
  """The workdir's tokenizer; one trained now (on `train_texts`) is saved with the texts' fingerprint."""
  directory = os.path.join(workdir, "tokenizer")
  trained_now = not os.path.isdir(directory)
  tokenizer = tokenizers.build_tokenizer(config.tokenizer, train_texts, directory, config.vocab_size)
  if trained_now:
    path = os.path.join(directory, TOKENIZER_FINGERPRINT_FILE)
    with open(path + ".tmp", "w") as file:
      json.dump({"texts_fingerprint": fingerprint}, file)
    os.replace(path + ".tmp", path)
  return tokenizer


def load_data(config: DataConfig, workdir: str) -> DataBundle:
  """Reads the texts, builds (or loads) the tokenizer and lays the documents out in rows.

  Raises ValueError before anything is written if workdir/tokenizer was trained on other texts.
  """
  fingerprint = texts_fingerprint(config)
  check_tokenizer_texts(os.path.join(workdir, "tokenizer"), fingerprint)
  if config.task != "lm":
    return _load_pairs(config, workdir, fingerprint)
  train_texts, eval_texts, eval_log_probs = _load_texts(config, workdir)
  tokenizer = _build_tokenizer(config, train_texts, workdir, fingerprint)
  train_docs = [tokenizer.encode(text) for text in train_texts]
  eval_docs = [tokenizer.encode(text) for text in eval_texts]
  if config.packing == "pad":
    num_eval_truncated = batching.count_truncated(eval_docs, config.seq_len)
    num_truncated = batching.count_truncated(train_docs, config.seq_len) + num_eval_truncated
    if num_eval_truncated:
      logging.warning("%d of %d evaluation documents are longer than seq_len=%d and were cut; "
                      "their rows do not hold the whole text and have no exact log-probability",
                      num_eval_truncated, len(eval_docs), config.seq_len)
    if eval_log_probs is not None:
      cut = np.array([len(doc) > config.seq_len - 1 for doc in eval_docs], bool)
      eval_log_probs = np.where(cut, np.nan, eval_log_probs)
  else:
    eval_log_probs, num_truncated = None, 0
  eval_rows = _rows(eval_docs, config, tokenizer)
  eval_num_tokens = np.sum((eval_rows != tokenizer.eos_id) & (eval_rows != tokenizer.pad_id),
                           axis=1, dtype=np.int32)
  return DataBundle(tokenizer=tokenizer, train_rows=_rows(train_docs, config, tokenizer),
                    eval_rows=eval_rows, eval_texts=tuple(eval_texts),
                    eval_log_probs=eval_log_probs, eval_num_tokens=eval_num_tokens,
                    eval_num_chars=np.array([_num_chars(row, tokenizer) for row in eval_rows], np.int32),
                    num_truncated=num_truncated)


def _load_pairs(config: DataConfig, workdir: str, fingerprint: str) -> DataBundle:
  """`load_data` for a pair task: rows [source..., EOS, target..., EOS, PAD, ...].

  A pair too long for a row loses the end of its target, as `batching.pad_documents` cuts it.
  """
  train, evaluation = _embedded_documents(config)
  train_pairs = [_pair(document, config) for document in train]
  eval_pairs = [_pair(document, config) for document in evaluation]
  train_sides = [side for pair in train_pairs for side in pair]  # Texts and records both.
  tokenizer = _build_tokenizer(config, train_sides, workdir, fingerprint)
  train_docs = _encode_pairs(train_pairs, tokenizer, config.seq_len)
  eval_docs = _encode_pairs(eval_pairs, tokenizer, config.seq_len)
  num_eval_truncated = batching.count_truncated(eval_docs, config.seq_len)
  if num_eval_truncated:
    logging.warning("%d of %d evaluation pairs are longer than seq_len=%d; their targets were cut",
                    num_eval_truncated, len(eval_docs), config.seq_len)
  eval_rows = _rows(eval_docs, config, tokenizer)
  target_ML = ~pairs_lib.source_mask(eval_rows, tokenizer.eos_id)
  target_text_ML = target_ML & (eval_rows != tokenizer.eos_id) & (eval_rows != tokenizer.pad_id)
  eval_targets = tuple(target for _, target in eval_pairs)
  return DataBundle(
      tokenizer=tokenizer, train_rows=_rows(train_docs, config, tokenizer), eval_rows=eval_rows,
      eval_texts=eval_targets, eval_log_probs=None,
      eval_num_tokens=np.sum(target_text_ML, axis=1, dtype=np.int32),
      eval_num_chars=np.array([len(tokenizer.decode(row[target]))
                               for row, target in zip(eval_rows, target_ML)], np.int32),
      num_truncated=batching.count_truncated(train_docs, config.seq_len) + num_eval_truncated,
      eval_sources=tuple(source for source, _ in eval_pairs), eval_targets=eval_targets,
      eval_records=tuple(dict(document.record) for document in evaluation))


def _pair(document: corpus.Document, config: DataConfig) -> tuple[str, str]:
  """(source, target) of a document for the config's pair task."""
  record = corpus.format_record(document.record, config.record_attributes)
  return (record, document.text) if config.task == "data_to_text" else (document.text, record)


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


def _num_chars(row_L: np.ndarray, tokenizer: tokenizers.Tokenizer) -> int:
  """Characters of the text in a row: each [EOS]-separated piece decoded on its own."""
  pieces = np.split(row_L, np.flatnonzero(row_L == tokenizer.eos_id))
  return sum(len(tokenizer.decode(piece[piece != tokenizer.eos_id])) for piece in pieces)


def _rows(docs: list[list[int]], config: DataConfig,
          tokenizer: tokenizers.Tokenizer) -> np.ndarray:
  """int32[N, L] rows of tokenized documents in the config's layout."""
  if config.packing == "pad":
    return batching.pad_documents(docs, config.seq_len, eos_id=tokenizer.eos_id,
                                  pad_id=tokenizer.pad_id)
  return batching.pack_documents(docs, config.seq_len, eos_id=tokenizer.eos_id)


def _load_texts(config: DataConfig,
                workdir: str) -> tuple[list[str], list[str], np.ndarray | None]:
  """Training texts, evaluation texts and, for the embedded corpus, their exact log-probs."""
  if config.source == "embedded":
    train, evaluation = _embedded_documents(config)
    return ([doc.text for doc in train], [doc.text for doc in evaluation],
            np.array([doc.log_prob for doc in evaluation], np.float64))
  if config.source == "text_files":
    settings = dict(data_dir=os.path.join(workdir, "tfds"), unit=config.unit,
                    validation_fraction=config.validation_fraction)
    return (local_text.load_local_texts(config.paths, split="train",
                                        max_texts=config.num_train_docs, **settings),
            local_text.load_local_texts(config.paths, split="validation",
                                        max_texts=config.num_eval_docs, **settings),
            None)
  return (_catalog_documents(config, "train", config.num_train_docs),
          _catalog_documents(config, config.tfds_eval_split, config.num_eval_docs),
          None)


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
