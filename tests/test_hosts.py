"""The global batch is the same on one process or several; data state covers every stream.

Processes are simulated in-process by building `HostBatches` with explicit process indices; the
real two-process run is in tests/test_multihost.py.
"""

import json

import numpy as np
import pytest

from kdjax.data import hosts, pipeline

from test_data import ByteTokenizer, _texts

SOURCE = [{'text': t} for t in _texts(40)]
SEQ_LEN, BATCH = 16, 8


def _host(num_shards, process_index, process_count):
  return hosts.HostBatches(
      lambda s: pipeline.train_iterator(SOURCE, ByteTokenizer(), seq_len=SEQ_LEN,
                                        batch_size=BATCH // num_shards, seed=3, shard_index=s,
                                        shard_count=num_shards),
      num_shards, process_index=process_index, process_count=process_count)


def _global_batches(num_shards, process_count, steps, skip=0, state=None):
  parts = [_host(num_shards, p, process_count) for p in range(process_count)]
  if state is not None:
    for part in parts:
      part.set_state(state)
  out = []
  for _ in range(skip + steps):
    rows = [next(part) for part in parts]
    out.append({k: np.concatenate([r[k] for r in rows]) for k in rows[0]})
  return out[skip:], parts


@pytest.mark.parametrize('process_count', [2, 4])
def test_global_batches_do_not_depend_on_the_process_count(process_count):
  one, _ = _global_batches(4, 1, 6)
  many, parts = _global_batches(4, process_count, 6)
  assert all(len(p.streams) == 4 // process_count for p in parts)
  for a, b in zip(one, many):
    assert a['inputs'].shape == (BATCH, SEQ_LEN)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_streams_read_disjoint_documents_and_process_rows_are_contiguous():
  batches, parts = _global_batches(2, 2, 1)
  # Process p runs stream p, whose rows are rows [p * B/2, (p + 1) * B/2) of the global batch.
  assert list(parts[0].streams) == [0] and list(parts[1].streams) == [1]
  for p in range(2):
    np.testing.assert_array_equal(next(_host(2, p, 2))['inputs'],
                                  batches[0]['inputs'][p * BATCH // 2:(p + 1) * BATCH // 2])
  # Streams read disjoint documents: the first row of each starts a different document.
  firsts = [ByteTokenizer().decode(next(_host(2, p, 2))['inputs'][0][1:7]) for p in range(2)]
  assert firsts[0] != firsts[1]


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_state_from_several_processes_resumes_on_any_process_count():
  # The checkpointed state is every stream's state; each process reads its own streams from it.
  _, parts = _global_batches(4, 2, 3)
  merged = {'num_shards': 4, 'streams': {}}
  for part in parts:
    merged['streams'].update(part.local_state())
  state = json.loads(json.dumps(merged))
  expected, _ = _global_batches(4, 1, 4, skip=3)
  for process_count in (1, 2, 4):
    resumed, _ = _global_batches(4, process_count, 4, state=state)
    for a, b in zip(expected, resumed):
      np.testing.assert_array_equal(a['inputs'], b['inputs'])
      np.testing.assert_array_equal(a['segment_ids'], b['segment_ids'])


def test_one_process_state_round_trips_through_json():
  host = _host(2, 0, 1)
  for _ in range(2):
    next(host)
  state = json.loads(json.dumps(host.get_state()))
  assert state['num_shards'] == 2 and set(state['streams']) == {'0', '1'}
  expected = [next(host) for _ in range(3)]
  resumed = _host(2, 0, 1)
  resumed.set_state(state)
  for a in expected:
    np.testing.assert_array_equal(a['inputs'], next(resumed)['inputs'])


def test_mismatched_stream_counts_are_refused():
  with pytest.raises(ValueError, match='config.data.num_shards: 3 is not a multiple'):
    hosts.owned_streams(3, 0, 2)
  host = _host(2, 0, 1)
  with pytest.raises(ValueError, match='num_shards must match'):
    host.set_state({'num_shards': 4, 'streams': {}})
