"""Reading a teacher cache: one step's arrays, checked, and the training stream with them.

Shape letters (the glossary is in kdjax/__init__.py): B batch, L length, J top-k entries per token,
E sample slots per token.

`TeacherCache(path).batch(step, tokens=batch)` gives step `step`'s arrays (the t_* keys of
estimators) after checking them against the batch; `CachedBatches(stream, cache)` is the training
stream with them added to every batch, its state resumable like the stream's. A host reads only
its own rows, and grain's ArrayRecordDataSource serves the files as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np

from kdjax.settings import TeacherSources
from kdjax.teacher_cache import estimators
from kdjax.teacher_cache import format as cache_format

CacheMismatch = cache_format.CacheMismatch


def host_rows(batch_size: int, process_index: int, process_count: int) -> range:
  """The global rows process `process_index` holds (data/hosts.py stacks streams in order)."""
  per = batch_size // process_count
  return range(process_index * per, (process_index + 1) * per)


def _load_manifest(path: str) -> dict[str, Any]:
  manifest_path = os.path.join(path, "manifest.json")
  if not os.path.isfile(manifest_path):
    raise FileNotFoundError(f"{manifest_path} not found; build the cache with "
                            "scripts/cache_teacher.py (an unfinished build has no manifest).")
  with open(manifest_path) as f:
    manifest = json.load(f)
  fmt, version = cache_format.FORMAT, cache_format.VERSION
  if (manifest.get("format"), manifest.get("version")) != (fmt, version):
    raise CacheMismatch(f"{manifest_path} is not a {fmt} v{version} manifest")
  return manifest


class TeacherCache:
  """A finished cache: `batch(step)` gives the teacher arrays of training step `step`.

    cache = TeacherCache(path)
    cache.check_config(config, workdir)      # once, before training: the right teacher & data
    t = cache.batch(step, tokens=batch)      # every step: raises CacheMismatch if misaligned
  """

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    self.manifest = m = _load_manifest(self.path)
    self.top_k, self.samples, self.steps = m["top_k"], m["samples"], m["steps"]
    self.batch_size, self.seq_len, self.vocab_size = m["batch_size"], m["seq_len"], m["vocab_size"]
    self.fields = m["layout"]
    # grain's own ArrayRecord source: the files are what any grain pipeline reads.
    self.source = grain.sources.ArrayRecordDataSource(
        [os.path.join(self.path, s) for s in m["shards"]])
    if len(self.source) != self.steps * self.batch_size:
      raise CacheMismatch(f"{self.path}: {len(self.source)} records, the manifest promises "
                          f"{self.steps} steps x {self.batch_size} rows")

  def records(self, step: int, rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
    if not 1 <= step <= self.steps:
      raise CacheMismatch(f"teacher cache {self.path} holds steps 1..{self.steps}; step {step} "
                          "was asked for. Build it for at least config.student_train.steps.")
    raw = [self.source[(step - 1) * self.batch_size + r] for r in rows]
    return [cache_format.decode_record(record, self.fields) for record in raw]

  def batch(self, step: int, tokens: dict[str, np.ndarray] | None = None,
            rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """{t_topk_ids, t_topk_logprobs, t_residual, [t_sample_*]} of step `step`: len(rows) x L
    (x J or x E) arrays of `rows` (default: all B rows), in their stored dtypes.

    `tokens`, the training batch of this step (its rows `rows`), is checked against the digest
    stored with every row: a cache built on other batches raises CacheMismatch.
    """
    rows = range(self.batch_size) if rows is None else rows
    decoded = self.records(step, rows)
    for r, rec in zip(rows, decoded):
      if int(rec["step"][()]) != step or int(rec["row"][()]) != r:
        raise CacheMismatch(f"{self.path}: record for step {step} row {r} holds step "
                            f"{int(rec['step'][()])} row {int(rec['row'][()])}; the files are "
                            "out of order or mixed.")
    if tokens is not None:
      self._check_tokens(step, tokens, rows, decoded)
    keys = cache_format.FIELD_KEYS
    names = [f[0] for f in self.fields if f[0] in keys]
    return {keys[n]: np.stack([rec[n] for rec in decoded]) for n in names}

  def _check_tokens(self, step: int, tokens: dict[str, np.ndarray], rows: Sequence[int],
                    decoded: list[dict[str, np.ndarray]]) -> None:
    digests = cache_format.row_digests(tokens)
    if digests.shape[0] != len(rows):
      raise ValueError(f"{digests.shape[0]} token rows for {len(rows)} cache rows")
    for i, (r, rec) in enumerate(zip(rows, decoded)):
      if not np.array_equal(digests[i], rec["digest"]):
        raise CacheMismatch(
            f"teacher cache {self.path}: step {step} row {r} was computed on other tokens "
            "than this batch. The cache must be built from the same data, seed "
            f"(config.seed + 1 = {self.manifest['data_seed']}) and batch shape as the run "
            "that reads it, and read with the step the batch belongs to.")

  def check_config(self, config: Any, workdir: str, estimator: str | None = None) -> None:
    """Raises CacheMismatch unless this cache fits the distilled phase `config` runs with the
    soft loss `estimator` (default: config.distill.cache_estimator)."""
    m = self.manifest
    estimator = estimator or TeacherSources.from_config(config.distill).cache_estimator or None
    want = {"data_seed": int(config.seed) + 1, "seq_len": int(config.data.seq_len),
            "batch_size": int(config.data.batch_size),
            "vocab_size": cache_format.vocab_size(config),
            "data_hash": cache_format.data_fingerprint(config),
            "teacher": cache_format.teacher_fingerprint(config, workdir)["hash"]}
    if estimator == "sampled":  # unbiased only at the temperature the draws were made at
      want["sample_temperature"] = float(config.distill.temperature)
    have = dict(m, teacher=m["teacher"]["hash"])
    wrong = [f"{k}: cache {have[k]!r}, config {v!r}" for k, v in want.items() if have[k] != v]
    if m["steps"] < int(config.student_train.steps):
      wrong.append(f"steps: cache {m['steps']}, config.student_train.steps "
                   f"{config.student_train.steps}")
    if estimator is not None:
      wrong += self._estimator_gaps(estimator)
    if wrong:
      raise CacheMismatch(f"teacher cache {self.path} does not fit this run ({'; '.join(wrong)})"
                          "; rebuild it with scripts/cache_teacher.py for this config.")

  def _estimator_gaps(self, estimator: str) -> list[str]:
    """What `estimator` needs that this cache lacks, as check_config's complaints."""
    if estimator not in estimators.NEEDS:
      raise CacheMismatch(f"unknown cache estimator {estimator!r}; choose one of: "
                          f"{', '.join(estimators.NEEDS)}")
    keys = cache_format.FIELD_KEYS
    stored = {keys[f[0]] for f in self.fields if f[0] in keys}
    missing = [k for k in estimators.NEEDS[estimator] if k not in stored]
    if missing:
      return [f"estimator {estimator!r} needs {', '.join(missing)}, which the cache "
              "lacks (build it with --estimator_samples for 'sampled')"]
    return []


class CachedBatches(Iterator):
  """The training stream with each batch's cached teacher arrays added (the t_* keys), each
  checked against the batch's tokens: what the distilled phase iterates instead of the stream.

  Batch n (n = 1, 2, ...) is step n's. The state is the stream's plus that count, so the training
  loop's checkpoint and resume work unchanged; `rows` are the global rows the stream yields
  (default: this process's, as data/hosts.py lays them out).
  """

  STEP_KEY = "teacher_cache_step"

  def __init__(self, stream: Iterator, cache: TeacherCache, rows: Sequence[int] | None = None):
    self.stream, self.cache, self.step = stream, cache, 0
    self.rows = rows if rows is not None else host_rows(cache.batch_size, jax.process_index(),
                                                        jax.process_count())

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self.stream)
    self.step += 1
    return {**batch, **self.cache.batch(self.step, tokens=batch, rows=self.rows)}

  def get_state(self) -> dict[str, Any]:
    return {**self.stream.get_state(), self.STEP_KEY: self.step}

  def set_state(self, state: dict[str, Any]) -> None:
    if self.STEP_KEY not in state:
      raise CacheMismatch("this checkpoint was written by a run without a teacher cache; resume "
                          "it without config.distill.teacher_cache, or start the phase afresh.")
    state = dict(state)
    self.step = int(state.pop(self.STEP_KEY))
    self.stream.set_state(state)
