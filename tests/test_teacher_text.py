"""Sequence-level distillation data (kdjax/data/teacher_text.py): prompts from documents, teacher
continuations, a TFDS dataset on disk, and the training pipeline reading it back.

The oracle for batched generation is kdjax.sample.generate on each prompt alone (no padding, no
batch neighbours). The model is a tiny random Transformer; the tokenizer maps characters to ids
(exact lengths and contents, no SentencePiece training). One greedy generation, compiled once, is
shared by the tests. Letters: B batch, P prompt width, N new tokens, L row length.
"""

import json
import os

import grain
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdjax import continuations, sample, sharding
from kdjax.data import pipeline, teacher_text
from kdjax.model import ModelConfig
from kdjax.state import init_params

CFG = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  mlp_dim=32, max_len=32)
PROMPT_TOKENS, NEW_TOKENS, BATCH = 4, 6, 3
DOCUMENTS = ('to be or not to be', '', 'ab', 'whether tis nobler in the mind',
             'the slings and arrows', 'of outrageous fortune', 'or to take arms')


class CharTokenizer:
  """ids = 4 + index in ALPHABET; specials 0-3 as kdjax's own tokenizer. Its vocabulary (31) is
  one short of the model's (32): the model may sample id 31, which decode cannot take."""

  ALPHABET = 'abcdefghijklmnopqrstuvwxyz '
  pad_id, bos_id, eos_id = 0, 1, 2
  vocab_size = 4 + len(ALPHABET)

  def encode(self, text):
    return [4 + self.ALPHABET.index(c) for c in text]

  def decode(self, ids):
    return ''.join(self.ALPHABET[i - 4] for i in ids if i >= 4)  # IndexError past the vocab


class NoBosCharTokenizer(CharTokenizer):
  bos_id = None


TOK = CharTokenizer()


def _source(texts=DOCUMENTS) -> grain.MapDataset:
  return grain.MapDataset.source([{'text': t} for t in texts])


@pytest.fixture(scope='module', autouse=True)
def _quiet_tfds():
  tfds.disable_progress_bar()


@pytest.fixture(scope='module')
def mesh():
  return sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})


@pytest.fixture(scope='module')
def params(mesh):
  return init_params(CFG, jax.random.key(5), mesh, sharding.DEFAULT_RULES)


@pytest.fixture(scope='module')
def prompts():
  # 8 prompts over 6 usable documents: every document, some twice, and 'ab' gives a short one.
  return teacher_text.prompts_from_source(_source(), TOK, num_prompts=8,
                                          prompt_tokens=PROMPT_TOKENS, seed=0)


def _greedy_ids(params, prompts, mesh, eos_id=TOK.eos_id):
  # 8 prompts in batches of 3: the last batch carries one row of filler.
  return continuations.continuation_ids(
      CFG, params, prompts, max_new_tokens=NEW_TOKENS, pad_id=TOK.pad_id, eos_id=eos_id,
      temperature=0.0, batch_size=BATCH, rng=jax.random.key(0), mesh=mesh)


@pytest.fixture(scope='module')
def greedy_texts(params, prompts, mesh):
  return continuations.generate_continuations(
      CFG, params, TOK, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, batch_size=BATCH,
      rng=jax.random.key(0), mesh=mesh)


@pytest.fixture(scope='module')
def stored(tmp_path_factory, greedy_texts):
  directory = str(tmp_path_factory.mktemp('teacher') / 'teacher_text')
  metadata = {'teacher': {'hash': 'abc'}, 'temperature': 0.0}
  assert teacher_text.write_dataset(directory, {'train': greedy_texts},
                                    metadata=metadata) == directory
  return directory


# ------------------------------------------------------------------------------------ prompts


def test_prompts_are_bos_and_the_first_tokens_of_documents_drawn_by_seed(prompts):
  usable = [d for d in DOCUMENTS if d]
  expected = {tuple([TOK.bos_id] + TOK.encode(d)[:PROMPT_TOKENS]) for d in usable}
  assert len(prompts) == 8 and {tuple(p) for p in prompts} == expected  # each document, no ''
  assert [TOK.bos_id] + TOK.encode('ab') in prompts  # shorter than PROMPT_TOKENS: kept short
  n = len(usable)
  assert prompts[n:] == prompts[:8 - n]  # cycled: the same visit order again
  again = teacher_text.prompts_from_source(_source(), TOK, num_prompts=8,
                                           prompt_tokens=PROMPT_TOKENS, seed=0)
  assert again == prompts
  others = [teacher_text.prompts_from_source(_source(), TOK, num_prompts=8,
                                             prompt_tokens=PROMPT_TOKENS, seed=s)
            for s in range(1, 4)]
  assert any(o != prompts for o in others)


def test_prompts_without_bos_and_from_empty_documents():
  prompts = teacher_text.prompts_from_source(_source(), NoBosCharTokenizer(), num_prompts=3,
                                             prompt_tokens=2, seed=1)
  assert all(len(p) <= 2 and TOK.bos_id not in p for p in prompts)
  bytes_source = grain.MapDataset.source([{'text': b'ab'}])  # a raw TFDS source's values
  assert teacher_text.prompts_from_source(bytes_source, TOK, num_prompts=1, prompt_tokens=9,
                                          seed=0) == [[TOK.bos_id, 4, 5]]
  with pytest.raises(ValueError, match='none of the 2 documents'):
    teacher_text.prompts_from_source(_source(['', '']), TOK, num_prompts=1, prompt_tokens=2,
                                     seed=0)


# --------------------------------------------------------------------------------- generation


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_batched_greedy_continuations_equal_each_prompt_alone(params, prompts, mesh):
  batched = _greedy_ids(params, prompts, mesh)
  for prompt, ids in zip(prompts, batched):
    alone_1xT = np.asarray(sample.generate(CFG, params, np.asarray([prompt], np.int32),
                                           max_new_tokens=NEW_TOKENS))
    new = alone_1xT[0, len(prompt):].tolist()
    cut = new[:new.index(TOK.eos_id)] if TOK.eos_id in new else new
    assert ids == prompt + cut
  assert len(batched) == len(prompts)


def test_continuations_stop_at_the_first_eos(params, prompts, mesh):
  uncut = _greedy_ids(params, prompts, mesh, eos_id=None)
  eos = uncut[0][len(prompts[0]) + 2]  # a token the model produced: call it EOS
  cut = _greedy_ids(params, prompts, mesh, eos_id=eos)
  for prompt, whole, ids in zip(prompts, uncut, cut):
    new = whole[len(prompt):]
    assert len(new) == NEW_TOKENS
    assert ids == prompt + (new[:new.index(eos)] if eos in new else new)
  assert len(cut[0]) <= len(prompts[0]) + 2


def test_texts_decode_the_ids_and_skip_ids_past_the_vocabulary(params, prompts, mesh,
                                                               greedy_texts):
  ids = _greedy_ids(params, prompts, mesh)
  assert greedy_texts == [TOK.decode([i for i in row if i < TOK.vocab_size]) for row in ids]
  assert continuations.decode(TOK, [1, 4, 31, 5, 2]) == 'ab'


def test_sampling_is_seeded(params, prompts):
  def texts(seed):
    return continuations.generate_continuations(
        CFG, params, TOK, prompts, max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=0,
        top_p=1.0, batch_size=BATCH, rng=jax.random.key(seed))
  first = texts(1)
  assert texts(1) == first
  assert texts(2) != first


# ------------------------------------------------------------------------------------ storage


def test_stored_texts_read_back_in_order(stored, greedy_texts):
  source = teacher_text.load_source(stored)
  assert [source[i] for i in range(len(source))] == [{'text': t} for t in greedy_texts]
  record = teacher_text.read_metadata(stored)
  assert record['examples'] == {'train': len(greedy_texts)}
  assert record['metadata'] == {'teacher': {'hash': 'abc'}, 'temperature': 0.0}
  assert not os.path.exists(stored + '.partial')


def test_stored_texts_train_through_the_pipeline(stored, greedy_texts):
  seq_len, batch_size = 8, 2
  batch = next(pipeline.train_iterator(teacher_text.load_source(stored), TOK, seq_len=seq_len,
                                       batch_size=batch_size, seed=0))
  for key in ('inputs', 'targets', 'segment_ids', 'positions', 'mask'):
    assert batch[key].shape == (batch_size, seq_len)
  for row in range(batch_size):
    for s in set(batch['segment_ids'][row].tolist()) - {0}:
      piece = TOK.decode(batch['inputs'][row][batch['segment_ids'][row] == s].tolist())
      assert any(piece in text for text in greedy_texts)


def test_an_existing_directory_is_refused_and_left_unchanged(tmp_path, stored):
  directory = tmp_path / 'out'
  directory.mkdir()
  (directory / 'keep.txt').write_text('mine')
  with pytest.raises(ValueError, match='exists'):
    teacher_text.write_dataset(str(directory), {'train': ['x']}, metadata={})
  assert os.listdir(directory) == ['keep.txt'] and (directory / 'keep.txt').read_text() == 'mine'
  before = sorted(os.walk(stored))
  with pytest.raises(ValueError, match='exists'):
    teacher_text.write_dataset(stored, {'train': ['x']}, metadata={})
  assert sorted(os.walk(stored)) == before
  with pytest.raises(ValueError, match='no texts'):
    teacher_text.write_dataset(str(tmp_path / 'empty'), {'train': []}, metadata={})


def test_a_missing_or_unreadable_dataset_says_how_to_build_one(tmp_path):
  with pytest.raises(FileNotFoundError, match='teacher_answers.py --from_documents'):
    teacher_text.load_source(str(tmp_path / 'nothing'))
  (tmp_path / 'broken').mkdir()
  (tmp_path / 'broken' / teacher_text.METADATA_FILE).write_text(
      json.dumps({'format': teacher_text.FORMAT, 'tfds_dir': 'teacher_text/1.0.0'}))
  with pytest.raises(FileNotFoundError, match='teacher_answers.py --from_documents'):
    teacher_text.load_source(str(tmp_path / 'broken'))
