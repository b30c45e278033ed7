"""Sequence-level distillation data (Kim & Rush, 2016): the teacher's own continuations of
prompts taken from the training documents, stored as a TFDS dataset that the grain pipeline
trains a student on exactly as it trains on the original corpus.

  prompts_from_source -> kdjax.continuations.generate_continuations -> write_dataset
    -> load_source -> pipeline

This module only reads and writes data; generating the texts needs a model and lives above
data/, in kdjax.continuations.

A stored example is {'text': decode(prompt ids + new ids)}: the prompt is kept, so the student
learns the whole sequence as one document (the pipeline puts BOS and EOS around it, as around
any document).

On disk (`directory`, written whole or not at all):

  <directory>/kdjax_teacher_text.json   where the TFDS dataset is, examples per split, and the
                                        caller's metadata (teacher fingerprint, settings)
  <directory>/<name>/1.0.0/             the TFDS dataset: features {'text': Text}, ArrayRecord
                                        files (random access, for tfds data sources and grain),
                                        examples in the order they were given (no shuffling)

Shape letters: kdjax's glossary (the package docstring).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from kdjax.cli import one_line
from kdjax.data.tokenizer import TextTokenizer

METADATA_FILE = 'kdjax_teacher_text.json'
FORMAT = 'kdjax_teacher_text/1'
_VERSION = '1.0.0'
_HOW_TO_BUILD = 'run scripts/teacher_answers.py --from_documents to generate it'


# ------------------------------------------------------------------------------------ prompts


def _text(example: Any) -> str:
  text = example['text'] if isinstance(example, Mapping) else example
  return text.decode('utf-8') if isinstance(text, bytes) else text


def _as_example(example: Any) -> dict[str, str]:
  # A module-level function, not a lambda: grain may pickle the map for worker processes.
  return {'text': _text(example)}


def prompts_from_source(source: Sequence[Any], tokenizer: TextTokenizer, *, num_prompts: int,
                        prompt_tokens: int, seed: int) -> list[list[int]]:
  """`num_prompts` prompts: BOS (where the tokenizer has one) + the first `prompt_tokens` ids of
  a document of `source` (examples {'text': str | bytes}, e.g. pipeline.load_source's train split).

  Documents are visited in an order drawn from `seed`, so the same seed gives the same prompts.
  A document without tokens is skipped; one shorter than prompt_tokens gives a shorter prompt.
  With fewer usable documents than num_prompts, the visit order repeats: the same prompts come
  again (sampled continuations of a repeated prompt still differ; greedy ones do not).
  """
  if num_prompts < 1 or prompt_tokens < 1:
    raise ValueError(f'num_prompts ({num_prompts}) and prompt_tokens ({prompt_tokens}) must be '
                     '>= 1.')
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  order = np.random.default_rng(seed).permutation(len(source))
  prompts: list[list[int]] = []
  while len(prompts) < num_prompts:
    found = len(prompts)
    for index in order:
      ids = tokenizer.encode(_text(source[int(index)]))[:prompt_tokens]
      if ids:
        prompts.append(bos + ids)
        if len(prompts) == num_prompts:
          break
    if len(prompts) == found:  # a whole pass found nothing: every document is empty
      raise ValueError(f'none of the {len(source)} documents has a token to prompt with.')
  return prompts


# ------------------------------------------------------------------------------------ storage


class _TextBuilder(tfds.dataset_builders.AdhocBuilder, skip_registration=True):
  """tfds.dataset_builders.store_as_tfds_dataset's builder, reading plain (key, example) lists.

  TFDS 4.9.10's own split generator tests each split with isinstance(..., tf.data.Dataset),
  which imports TensorFlow; kdjax runs without it (TFDS writes ArrayRecord without TensorFlow).
  """

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: iter(examples) for split, examples in self._split_datasets.items()}


def write_dataset(directory: str | os.PathLike[str], texts_by_split: Mapping[str, Sequence[str]],
                  *, name: str = 'teacher_text', metadata: Mapping[str, Any]) -> str:
  """Stores {split: texts} as a TFDS dataset in `directory` (see the module docstring); returns
  the directory. `metadata` must be JSON-serializable.

  Built in `<directory>.partial` and renamed when complete, so `directory` either does not exist
  or holds a whole dataset; an existing `directory` is refused and left as it is.
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory):
    raise ValueError(f'{directory} exists; teacher text is never overwritten: remove it or '
                     'choose another directory.')
  if not texts_by_split or (empty := [s for s, t in texts_by_split.items() if not t]):
    raise ValueError(f'no texts to store (empty splits: {empty if texts_by_split else "all"}).')
  partial = directory + '.partial'
  shutil.rmtree(partial, ignore_errors=True)  # what an interrupted build left
  builder = _TextBuilder(
      name=name, version=_VERSION,
      features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
      # Integer keys and no shuffling: the files hold the texts in the order given.
      split_datasets={split: [(i, {'text': t}) for i, t in enumerate(texts)]
                      for split, texts in texts_by_split.items()},
      data_dir=partial, file_format='array_record', disable_shuffling=True,
      description=f'Teacher continuations for sequence-level distillation; see {METADATA_FILE}.')
  # The data is all here: no GCS lookup (it needs network), nothing to download.
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False))
  shutil.rmtree(os.path.join(partial, 'downloads'), ignore_errors=True)  # empty, TFDS's own
  record = {'format': FORMAT, 'tfds_dir': os.path.relpath(builder.data_dir, partial),
            'examples': {split: len(texts) for split, texts in texts_by_split.items()},
            'metadata': dict(metadata)}
  with open(os.path.join(partial, METADATA_FILE), 'w') as f:
    json.dump(record, f, indent=1, sort_keys=True)
  os.replace(partial, directory)
  return directory


def read_metadata(directory: str | os.PathLike[str]) -> dict[str, Any]:
  """The record write_dataset left in `directory`: format, tfds_dir, examples, metadata."""
  path = os.path.join(os.fspath(directory), METADATA_FILE)
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError) as e:
    raise FileNotFoundError(f'{directory} holds no readable teacher-text dataset ({path}: '
                            f'{type(e).__name__}); {_HOW_TO_BUILD}.') from None
  if record.get('format') != FORMAT:
    raise FileNotFoundError(f'{path} has format {record.get("format")!r}, not {FORMAT!r}; '
                            f'{_HOW_TO_BUILD} again.')
  return record


def load_source(directory: str | os.PathLike[str], split: str = 'train') -> grain.MapDataset:
  """Random-access examples {'text': str} of a stored split: what pipeline.load_source gives, so
  pipeline.train_iterator / eval_batches take it as they take the original corpus."""
  record = read_metadata(directory)
  tfds_dir = os.path.join(os.fspath(directory), record['tfds_dir'])
  try:
    source = tfds.builder_from_directory(tfds_dir).as_data_source(split)
  except OSError as e:  # TFDS's DatasetInfoFileError for a missing dataset_info.json
    raise FileNotFoundError(f'{tfds_dir} is not a readable TFDS dataset '
                            f'({one_line(e, 120)}); {_HOW_TO_BUILD}.') from None
  return grain.MapDataset.source(source).map(_as_example)
