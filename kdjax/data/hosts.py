"""The global batch split over processes, identical whatever the number of processes.

The training data is `num_shards` independent streams: stream s reads documents s, s + S, ... (S =
num_shards) through its own grain pipeline and yields B / S rows per step, and the global batch is
the rows of streams 0 .. S-1 stacked in order. Process p of P runs only the streams
[p * S / P, (p + 1) * S / P), which are exactly its rows of the global batch. So a run sees the
same batches on one host or on P of them (any P dividing S), each host reads and tokenizes only
its share, and a checkpoint taken with P processes resumes with any other such P.

The iterator state is every stream's grain state. Saving gathers the streams' states from all
processes (a small all-gather of JSON, at checkpoint steps only), so the checkpoint holds the
whole data position, written once by the primary process.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np


def owned_streams(num_shards: int, process_index: int, process_count: int) -> range:
  if num_shards % process_count:
    raise ValueError(f"config.data.num_shards: {num_shards} is not a multiple of the process "
                     f"count {process_count}; set it to a multiple of {process_count}.")
  per_process = num_shards // process_count
  return range(process_index * per_process, (process_index + 1) * per_process)


def _allgather_json(value: Any) -> list[Any]:
  """Every process's `value`, in process order (a collective: all processes must call it)."""
  from jax.experimental import multihost_utils

  raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([raw.size], np.int32))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:raw.size] = raw
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return [json.loads(row[:int(n)].tobytes().decode())
          for row, n in zip(gathered, np.asarray(lengths).reshape(-1))]


class HostBatches(Iterator):
  """This process's rows of each global batch: its streams' batches concatenated in order."""

  def __init__(self, make_stream: Callable[[int], Any], num_shards: int,
               process_index: int | None = None, process_count: int | None = None):
    self.num_shards = num_shards
    self.process_count = jax.process_count() if process_count is None else process_count
    index = jax.process_index() if process_index is None else process_index
    self.streams = {s: make_stream(s) for s in owned_streams(num_shards, index, self.process_count)}

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(stream) for stream in self.streams.values()]
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def local_state(self) -> dict[str, Any]:
    return {str(s): stream.get_state() for s, stream in self.streams.items()}

  def get_state(self) -> dict[str, Any]:
    """All S streams' states (gathered from every process when there are several)."""
    local = self.local_state()
    parts = _allgather_json(local) if self.process_count > 1 else [local]
    return {"num_shards": self.num_shards,
            "streams": {s: state for part in parts for s, state in part.items()}}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("num_shards") != self.num_shards:
      raise ValueError(f"data state holds {state.get('num_shards')} streams, this run has "
                       f"{self.num_shards}; config.data.num_shards must match the checkpoint.")
    for s, stream in self.streams.items():
      stream.set_state(state["streams"][str(s)])
