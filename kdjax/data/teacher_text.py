"""Sequence-level distillation data (Kim & Rush, 2016): the teacher's own continuations of
prompts taken from the training documents, stored as a TFDS dataset that the grain pipeline
trains a student on exactly as it trains on the original corpus.

  prompts_from_source -> generate_continuations -> write_dataset -> load_source -> pipeline

A stored example is {'text': decode(prompt ids + new ids)}: the prompt is kept, so the student
learns the whole sequence as one document (the pipeline puts BOS and EOS around it, as around
any document).

On disk (`directory`, written whole or not at all):

  <directory>/kdjax_teacher_text.json   where the TFDS dataset is, examples per split, and the
                                        caller's metadata (teacher fingerprint, settings)
  <directory>/<name>/1.0.0/             the TFDS dataset: features {'text': Text}, ArrayRecord
                                        files (random access, for tfds data sources and grain),
                                        examples in the order they were given (no shuffling)

Letters in names: B batch, P prompt width (with left padding), N new tokens, T = P + N.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from kdjax import sample
from kdjax.data.tokenizer import TextTokenizer
from kdjax.model import ModelConfig

METADATA_FILE = 'kdjax_teacher_text.json'
FORMAT = 'kdjax_teacher_text/1'
_VERSION = '1.0.0'
_HOW_TO_BUILD = 'run scripts/teacher_sequences.py to generate it'


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


# --------------------------------------------------------------------------------- generation


def _left_pad(prompts: Sequence[Sequence[int]], width: int, pad_id: int) -> np.ndarray:
  """prompt_BxP at a fixed width P (sample.left_pad takes the batch's own): one program for all
  batches, whatever their longest prompt."""
  prompt_BxP = np.full((len(prompts), width), pad_id, np.int32)
  for row, prompt in zip(prompt_BxP, prompts):
    row[width - len(prompt):] = prompt
  return prompt_BxP


def _cut_at_eos(new_ids: Sequence[int], eos_id: int | None) -> list[int]:
  new_ids = [int(i) for i in new_ids]
  if eos_id is not None and eos_id in new_ids:
    return new_ids[:new_ids.index(eos_id)]
  return new_ids


def continuation_ids(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
                     max_new_tokens: int, pad_id: int, eos_id: int | None,
                     temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, batch_size: int = 64,
                     rng: jax.Array | None = None, mesh=None) -> list[list[int]]:
  """For each prompt, its ids followed by the sampled new ids up to (without) the first eos_id.

  Batches of `batch_size` prompts go through sample.generate, left-padded to the longest prompt
  of all; the last batch is filled up with copies of its last prompt (their outputs dropped), so
  every batch has one shape and one compiled program serves them all. Batch i samples with
  fold_in(rng, i): the texts depend on (rng, prompts, batch_size), not on anything else.
  Temperature 0 is greedy, where top-k and top-p have no effect; top_k 0 and top_p 1.0 are off,
  as None is.
  """
  if not prompts:
    return []
  if empty := [i for i, p in enumerate(prompts) if not p]:
    raise ValueError(f'prompts {empty[:5]} have no tokens; every prompt needs at least one.')
  rng = jax.random.key(0) if rng is None else rng
  # One spelling of "off" for each, so equal settings share one compiled program.
  top_k, top_p = top_k or None, None if top_p is None or top_p >= 1.0 else top_p
  width = max(len(p) for p in prompts)
  out: list[list[int]] = []
  for i, start in enumerate(range(0, len(prompts), batch_size)):
    batch = list(prompts[start:start + batch_size])
    real = len(batch)
    batch += [batch[-1]] * (batch_size - real)
    tokens_BxT = np.asarray(sample.generate(
        cfg, params, _left_pad(batch, width, pad_id), max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, rng=jax.random.fold_in(rng, i),
        mesh=mesh, prompt_lengths_B=np.asarray([len(p) for p in batch], np.int32)))
    for prompt, new_N in zip(batch[:real], tokens_BxT[:real, width:]):
      out.append([int(t) for t in prompt] + _cut_at_eos(new_N, eos_id))
  return out


def decode(tokenizer: TextTokenizer, ids: Sequence[int]) -> str:
  """Text of ids, without the ids past the tokenizer's vocabulary: a teacher whose vocab_size is
  padded past the tokenizer's may (rarely) sample one, and no tokenizer can decode it."""
  return tokenizer.decode([i for i in ids if i < tokenizer.vocab_size])


def generate_continuations(cfg: ModelConfig, params, tokenizer: TextTokenizer,
                           prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                           temperature: float = 1.0, top_k: int | None = None,
                           top_p: float | None = None, batch_size: int = 64,
                           rng: jax.Array | None = None, mesh=None) -> list[str]:
  """Each prompt and its sampled continuation (cut at the tokenizer's EOS), as text; see
  continuation_ids."""
  ids = continuation_ids(
      cfg, params, prompts, max_new_tokens=max_new_tokens, pad_id=tokenizer.pad_id,
      eos_id=tokenizer.eos_id, temperature=temperature, top_k=top_k, top_p=top_p,
      batch_size=batch_size, rng=rng, mesh=mesh)
  return [decode(tokenizer, row) for row in ids]


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
                            f'({" ".join(str(e).split())[:120]}); {_HOW_TO_BUILD}.') from None
  return grain.MapDataset.source(source).map(_as_example)
