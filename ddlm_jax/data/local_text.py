"""Local text files as a TFDS dataset, and catalog TFDS datasets, read without TensorFlow.

`LocalText` turns text files into examples with one feature, 'text', in two splits: 'train' and
'validation'. It is written as array_record and read back through a TFDS data source, the one
combination that TFDS supports without TensorFlow.

The unit says what an example is and where the split falls:
  'paragraph': a document is a run of non-blank lines, joined by newlines. In tiny-shakespeare this
      is one speech, the speaker's name and their lines (7,222 documents, median 83 characters),
      which keeps a line of verse with its speaker; the default.
  'line': a document is one non-blank line.
  'stream': no documents: the files' text as one stream of characters (text8/enwik8-style). Each
      file is kept exactly as read (CRLF and blank lines too); files are joined by a newline where
      one does not end with one. 'validation' is the last `validation_fraction` of the characters,
      cut at character round(n * (1 - validation_fraction)). Each split is stored in order as
      chunks of at most STREAM_CHUNK_CHARS characters (so a 100 MB file makes bounded examples);
      join a split's chunks to get its text.
For the document units, 'validation' is the last `validation_fraction` of the documents, taken in
file order, so neighbouring lines never straddle the split.

  texts = load_local_texts(["notes.txt"], data_dir=f"{workdir}/tfds", split="train")
  text = "".join(load_local_texts(["notes.txt"], data_dir, "validation", unit="stream"))
"""
import dataclasses
import hashlib
from collections.abc import Sequence

from etils import epath
import tensorflow_datasets as tfds

UNITS = ("paragraph", "line", "stream")
DOCUMENT_UNITS = ("paragraph", "line")
# Characters per stored example of a 'stream' split.
STREAM_CHUNK_CHARS = 2**20


def split_documents(text: str, unit: str) -> list[str]:
  """The non-blank documents of `text` ('paragraph' or 'line'); CRLF counts as a newline."""
  if unit not in DOCUMENT_UNITS:
    raise ValueError(f"unknown document unit {unit!r}; expected one of {DOCUMENT_UNITS}")
  lines = text.replace("\r\n", "\n").split("\n")
  if unit == "line":
    return [line for line in lines if line.strip()]
  documents, paragraph = [], []
  for line in lines + [""]:
    if line.strip():
      paragraph.append(line)
    elif paragraph:
      documents.append("\n".join(paragraph))
      paragraph = []
  return documents


def read_text_file(path: str) -> str:
  """The UTF-8 text of `path`; a ValueError naming the file if it is missing or not text."""
  file = epath.Path(path)
  if not file.is_file():
    raise ValueError(f"text file {path} does not exist or is not a file")
  data = file.read_bytes()
  first_nul = data.find(b"\0")
  if first_nul >= 0:
    raise ValueError(f"text file {path} contains NUL bytes (first at byte {first_nul}); "
                     "it looks binary")
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as error:
    raise ValueError(f"text file {path} is not valid UTF-8 (byte {error.start}); "
                     "it looks binary or uses another encoding") from None


def read_documents(paths: Sequence[str], unit: str) -> list[str]:
  """The documents of every file in order; a ValueError naming any file that has none."""
  if not paths:
    raise ValueError("no text files given")
  documents = []
  for path in paths:
    file_documents = split_documents(read_text_file(path), unit)
    if not file_documents:
      raise ValueError(f"text file {path} has no documents: it is empty or only whitespace")
    documents += file_documents
  return documents


def read_stream(paths: Sequence[str]) -> str:
  """The files' text as one stream: each file exactly as read, joined by a newline where a file
  does not end with one; a ValueError naming any file that is empty."""
  if not paths:
    raise ValueError("no text files given")
  texts = []
  for path in paths:
    text = read_text_file(path)
    if not text:
      raise ValueError(f"text file {path} is empty")
    texts.append(text)
  return "".join(text if text.endswith("\n") else text + "\n" for text in texts[:-1]) + texts[-1]


def split_stream(text: str, validation_fraction: float) -> tuple[str, str]:
  """(train, validation): `text` cut at character round(len * (1 - validation_fraction)), moved
  where needed to leave both parts non-empty."""
  if not 0 < validation_fraction < 1:
    raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
  if len(text) < 2:
    raise ValueError(f"a train/validation split of a stream needs at least 2 characters, got {len(text)}")
  cut = min(max(round(len(text) * (1 - validation_fraction)), 1), len(text) - 1)
  return text[:cut], text[cut:]


def num_validation_documents(num_documents: int, validation_fraction: float) -> int:
  """Size of the validation split: the fraction rounded, leaving both splits non-empty."""
  if not 0 < validation_fraction < 1:
    raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
  if num_documents < 2:
    raise ValueError(f"a train/validation split needs at least 2 documents, got {num_documents}")
  return min(max(round(num_documents * validation_fraction), 1), num_documents - 1)


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
  """Which files, how to cut them into examples (`UNITS`), and how much to hold out.

  Build it with `make_config`, which checks the files and names the config after their content,
  so a changed file gets a new dataset instead of a stale one.
  """
  paths: tuple[str, ...] = ()
  unit: str = "paragraph"
  validation_fraction: float = 0.05


def make_config(paths: Sequence[str], *, unit: str = "paragraph",
                validation_fraction: float = 0.05) -> LocalTextConfig:
  """A checked config; raises ValueError, before anything is written, on bad files or settings."""
  if unit not in UNITS:
    raise ValueError(f"unknown unit {unit!r}; expected one of {UNITS}")
  digest = hashlib.sha256(repr((unit, validation_fraction)).encode())
  if unit == "stream":
    text = read_stream(paths)
    split_stream(text, validation_fraction)
    digest.update(text.encode())
    description = f"{len(text)} characters as one stream"
  else:
    documents = read_documents(paths, unit)
    if len(documents) < 2:
      raise ValueError(
          f"{', '.join(map(str, paths))}: {len(documents)} document (a {unit} ends at "
          f"{'a newline' if unit == 'line' else 'a blank line'}); a train/validation split needs at least 2: "
          "add documents, or cut the text into chunks with unit='stream' (config.data.unit)")
    num_validation_documents(len(documents), validation_fraction)
    for document in documents:
      digest.update(document.encode())
      digest.update(b"\0")  # Documents hold no NUL, so this separates them unambiguously.
    description = f"{len(documents)} documents ({unit}s)"
  return LocalTextConfig(
      name=f"{unit}_{digest.hexdigest()[:16]}",
      description=f"{description} from {len(paths)} file(s)",
      paths=tuple(str(path) for path in paths),
      unit=unit,
      validation_fraction=validation_fraction)


class LocalText(tfds.core.GeneratorBasedBuilder):
  """Documents (or chunks of one stream) from local text files, in 'train' and 'validation'."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Documents, or chunks of one stream of characters, from local text files.",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        disable_shuffling=True)  # Keep file order, so the validation tail stays a tail.

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    if config.unit == "stream":
      train, validation = split_stream(read_stream(config.paths), config.validation_fraction)
      return {"train": self._generate_chunks(train), "validation": self._generate_chunks(validation)}
    documents = read_documents(config.paths, config.unit)
    num_train = len(documents) - num_validation_documents(len(documents),
                                                          config.validation_fraction)
    return {"train": self._generate_examples(documents, 0, num_train),
            "validation": self._generate_examples(documents, num_train, len(documents))}

  def _generate_examples(self, documents: list[str], start: int, stop: int):
    for index in range(start, stop):
      yield index, {"text": documents[index]}

  def _generate_chunks(self, text: str):
    for index, start in enumerate(range(0, len(text), STREAM_CHUNK_CHARS)):
      yield index, {"text": text[start:start + STREAM_CHUNK_CHARS]}


def load_local_texts(paths: Sequence[str], data_dir: str, split: str, *,
                     unit: str = "paragraph", validation_fraction: float = 0.05,
                     max_texts: int | None = None) -> list[str]:
  """Examples of `split` ('train' or 'validation'), building the dataset in `data_dir` once: the
  documents, or for unit='stream' the split's chunks in order (join them for its text).

  Args:
    paths: UTF-8 text files, read in this order.
    data_dir: TFDS data directory; the dataset is cached there, keyed by the files' content.
    split: 'train' or 'validation'.
    unit: 'paragraph', 'line' or 'stream' (see the module docstring).
    validation_fraction: share of the documents (of the characters for 'stream'), from the end,
      held out for 'validation'.
    max_texts: read at most this many examples from the start of the split.

  Raises:
    ValueError: naming the file, when one is missing, empty or binary; nothing is written then.
  """
  builder = LocalText(config=make_config(paths, unit=unit, validation_fraction=validation_fraction),
                      data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return _texts(builder, split, "text", max_texts)


def load_catalog_texts(name: str, split: str, data_dir: str | None, text_key: str = "text", *,
                       max_texts: int | None = None, download: bool = True) -> list[str]:
  """The `text_key` feature of a TFDS catalog dataset such as 'lm1b' or 'tiny_shakespeare'.

  The dataset is read as array_record through a TFDS data source. When it is not yet prepared in
  `data_dir` and `download` is set, TFDS downloads and prepares it, which needs network access
  (and, for some catalog datasets, TensorFlow).

  Raises:
    ValueError: saying why the dataset, split or feature is unavailable.
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except tfds.core.DatasetNotFoundError as error:
    raise ValueError(f"TFDS has no dataset named {name!r}: {error.args[0].splitlines()[0]}"
                     ) from None
  if not builder.is_prepared():
    if not download:
      raise ValueError(
          f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; allow the download "
          "(needs network access) or prepare it there with file_format='array_record'")
    try:
      builder.download_and_prepare()
    except Exception as error:
      raise ValueError(
          f"could not download and prepare TFDS dataset {name!r} in {builder.data_dir} as "
          f"array_record (this needs network access): {type(error).__name__}: {error}"
      ) from error
  return _texts(builder, split, text_key, max_texts)


def _texts(builder: tfds.core.DatasetBuilder, split: str, text_key: str,
           max_texts: int | None) -> list[str]:
  """Decoded `text_key` strings of the first `max_texts` (default: all) examples of a split."""
  name = builder.info.full_name
  if split not in builder.info.splits:
    raise ValueError(f"TFDS dataset {name} has no split {split!r}; it has "
                     f"{sorted(builder.info.splits)}")
  if text_key not in builder.info.features:
    raise ValueError(f"TFDS dataset {name} has no feature {text_key!r}; it has "
                     f"{sorted(builder.info.features)}")
  source = builder.as_data_source(split=split)
  count = len(source) if max_texts is None else min(max_texts, len(source))
  return [_as_str(example[text_key]) for example in source.__getitems__(range(count))]


def _as_str(value: bytes | str) -> str:
  return value.decode() if isinstance(value, bytes) else value
