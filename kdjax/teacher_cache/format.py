"""The on-disk format of a teacher cache: record layout, manifest and fingerprints.

Shape letters (the glossary is in kdjax/__init__.py): B batch, L length, V vocab, J top-k entries
per token, E sample slots per token.

One ArrayRecord record is one row of one step, record index (step - 1) * B + row. A record is
fixed-size little-endian raw arrays, in the order `manifest['layout']` lists them:

  step, row             int64          where the record belongs (a misordered file is caught)
  digest                16 x uint8     blake2b of the row's inputs, targets and segment ids
  topk_ids              L x J          uint16 (uint32 past 65536 ids), sorted by probability
  topk_logprobs         L x J          log p_v at T = 1, float16 (default) or float32
  residual              L float32      log(1 - sum of the top-k p): the tail's log-mass
  sample_ids            L x E          distinct ids among E draws from p_Ts (slots past them: 0)
  sample_counts         L x E          how often each was drawn (0 = an unused slot)
  sample_logprobs       L x E          log p_Ts of the sampled ids (0 on unused slots)

(sample_* only with samples > 0; p_Ts is the teacher at the manifest's sample_temperature, the
training temperature the 'sampled' estimator is unbiased for.) No pickle anywhere: manifest.json
says how to read the bytes.

Why float16 log-probs: it halves the dominant cost (2 + 2 bytes per cached id instead of 2 + 4)
and its rounding is relative to |log p|: |d log p| <= 2^-11 |log p|, so an id with p = 1e-3
gets p off by 0.3%; top ids (log p near 0) are nearly exact. The tail's log-mass is one float32
per token, computed as a log-sum-exp over the ids outside the top-k (no cancellation when the
top-k hold nearly all the mass).

The manifest also carries fingerprints of the teacher and of the data settings, so a reader can
refuse a cache built for another run (reader.TeacherCache.check_config).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from kdjax.blockwise_attention import ATTENTION_KERNEL_FIELDS
from kdjax.settings import FrozenTeacher, ModelSources
from kdjax.teacher_cache import estimators

FORMAT = "kdjax-teacher-cache"
VERSION = 1
_HEADER = (("step", "<i8", ()), ("row", "<i8", ()), ("digest", "|u1", (16,)))
# Record fields (without the header) and the keys TeacherCache.batch returns them under.
FIELD_KEYS = {"topk_ids": estimators.TOPK_IDS, "topk_logprobs": estimators.TOPK_LOGPROBS,
              "residual": estimators.RESIDUAL, "sample_ids": estimators.SAMPLE_IDS,
              "sample_counts": estimators.SAMPLE_COUNTS,
              "sample_logprobs": estimators.SAMPLE_LOGPROBS}
_LOGPROB_DTYPES = {"float16": "<f2", "float32": "<f4"}


class CacheMismatch(ValueError):
  """The cache does not belong to this run: other batches, teacher, or settings."""


# ---------------------------------------------------------------------------------- records


def _uint_for(max_value: int) -> str:
  for dtype in ("|u1", "<u2", "<u4"):
    if max_value <= np.iinfo(np.dtype(dtype)).max:
      return dtype
  raise ValueError(f"{max_value} does not fit uint32")


def layout(*, seq_len: int, top_k: int, samples: int, vocab_size: int,
           logprob_dtype: str = "float16") -> list[list]:
  """[name, numpy dtype string, per-row shape] of every record field, in record order."""
  if logprob_dtype not in _LOGPROB_DTYPES:
    raise ValueError(f"logprob_dtype: {logprob_dtype!r}; choose one of {list(_LOGPROB_DTYPES)}")
  if not 0 <= top_k <= vocab_size or not top_k + samples:
    raise ValueError(f"top_k={top_k}, samples={samples}: need 0 <= top_k <= vocab_size "
                     f"({vocab_size}) and at least one of them > 0")
  ids, lp = _uint_for(max(vocab_size - 1, 1)), _LOGPROB_DTYPES[logprob_dtype]
  fields = [[n, d, list(s)] for n, d, s in _HEADER]
  if top_k:
    fields += [["topk_ids", ids, [seq_len, top_k]], ["topk_logprobs", lp, [seq_len, top_k]],
               ["residual", "<f4", [seq_len]]]
  if samples:
    fields += [["sample_ids", ids, [seq_len, samples]],
               ["sample_counts", _uint_for(samples), [seq_len, samples]],
               ["sample_logprobs", lp, [seq_len, samples]]]
  return fields


def _nbytes(field: Sequence) -> int:
  return int(np.dtype(field[1]).itemsize * np.prod(field[2], dtype=np.int64))


def record_bytes(fields: list[list]) -> int:
  return sum(_nbytes(f) for f in fields)


def bytes_per_token(manifest: dict[str, Any], estimator: str | None = None) -> float:
  """Raw record bytes per token: of the whole record, or of what `estimator` needs from it
  (with the per-row header, step, row and digest, spread over the row's tokens)."""
  needs = estimators.NEEDS[estimator] if estimator else tuple(FIELD_KEYS.values())
  fields = [f for f in manifest["layout"] if f[0] not in FIELD_KEYS or FIELD_KEYS[f[0]] in needs]
  return record_bytes(fields) / manifest["seq_len"]


def row_digests(batch: dict[str, np.ndarray]) -> np.ndarray:
  """B x 16 uint8: what each row's record was computed on (tokens and document boundaries)."""
  rows = batch["inputs"].shape[0]
  out = np.zeros((rows, 16), np.uint8)
  for r in range(rows):
    h = hashlib.blake2b(digest_size=16)
    for key in ("inputs", "targets", "segment_ids"):
      h.update(np.ascontiguousarray(batch[key][r], "<i4").tobytes())
    out[r] = np.frombuffer(h.digest(), np.uint8)
  return out


def encode_rows(step: int, batch: dict[str, np.ndarray], targets: dict[str, np.ndarray],
                fields: list[list]) -> list[bytes]:
  """One record per row of `batch` (global rows 0..B-1 of step `step`)."""
  digests = row_digests(batch)
  rows = []
  for r in range(digests.shape[0]):
    values = {"step": step, "row": r, "digest": digests[r]}
    parts = []
    for name, dtype, shape in fields:
      value = values[name] if name in values else targets[FIELD_KEYS[name]][r]
      if name.endswith("logprobs") or name == "residual":
        value = np.asarray(value, np.float32)  # one rounding, from float32, to the stored dtype
      parts.append(np.ascontiguousarray(np.broadcast_to(np.asarray(value).astype(dtype),
                                                        shape)).tobytes())
    rows.append(b"".join(parts))
  return rows


def decode_record(record: bytes, fields: list[list]) -> dict[str, np.ndarray]:
  """The fields of one record (numpy views of the bytes, in their stored dtypes)."""
  if len(record) != record_bytes(fields):
    raise ValueError(f"record of {len(record)} bytes; the manifest's layout needs "
                     f"{record_bytes(fields)}")
  out, offset = {}, 0
  for field in fields:
    name, dtype, shape = field
    n = _nbytes(field)
    out[name] = np.frombuffer(record, dtype, count=n // np.dtype(dtype).itemsize,
                              offset=offset).reshape(shape)
    offset += n
  return out


# ---------------------------------------------------------------------------------- fingerprints


def _sha(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def teacher_fingerprint(config: Any, workdir: str) -> dict[str, Any]:
  """Which teacher a cache comes from, as far as the config tells without loading it: its
  shapes, how it runs (frozen_teacher dtypes) and its source (path and latest checkpoint step)."""
  sources = ModelSources.from_config(config)
  if sources.teacher_hf:
    source = {"teacher_hf": os.path.abspath(sources.teacher_hf)}
  else:
    given = sources.teacher_checkpoint
    directory = given or os.path.join(workdir, "teacher", "checkpoints")
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(
        directory) else []
    # A workdir's own teacher is named relative to it, so a moved workdir keeps its caches.
    source = {"teacher_checkpoint": os.path.abspath(given) if given else "<workdir>/teacher",
              "step": max(steps) if steps else None}
  frozen = FrozenTeacher.from_config(config)
  # The attention kernel fields leave the teacher's outputs as they were (to float32 rounding).
  teacher = {k: v for k, v in config.teacher.to_dict().items() if k not in ATTENTION_KERNEL_FIELDS}
  described = {"teacher": teacher, "source": source,
               "dtype": frozen.dtype, "param_dtype": frozen.param_dtype}
  return {**described, "hash": _sha(described)}


_TRAIN_DATA_FIELDS = ("name", "train_split", "text_key", "tokenizer_path", "vocab_size",
                      "seq_len", "batch_size", "num_shards", "tokenizer_max_documents")


def data_fingerprint(config: Any) -> str:
  """Hash of the data settings that decide the training batches (not where files live)."""
  return _sha({k: config.data[k] for k in _TRAIN_DATA_FIELDS})


def vocab_size(config: Any) -> int:
  """The ids the soft loss compares (losses.shared_vocab): the smaller of the two models'."""
  return min(int(config.teacher.vocab_size), int(config.student.vocab_size))


# ---------------------------------------------------------------------------------- the manifest


def new_manifest(*, top_k: int, samples: int, vocab_size: int, seq_len: int, batch_size: int,
                 steps: int, data_seed: int, sample_seed: int, sample_temperature: float = 1.0,
                 logprob_dtype: str = "float16", shard_steps: int = 0,
                 teacher: dict | None = None, data_hash: str = "") -> dict[str, Any]:
  """The manifest of a cache before any file exists (`plan` fills it from a config)."""
  fields = layout(seq_len=seq_len, top_k=top_k, samples=samples, vocab_size=vocab_size,
                  logprob_dtype=logprob_dtype)
  # About 256 MiB per file by default: few enough files, each small enough to copy.
  step_bytes = record_bytes(fields) * batch_size
  shard_steps = int(shard_steps) or max(1, min(steps, (256 << 20) // step_bytes))
  return {"format": FORMAT, "version": VERSION, "top_k": top_k, "samples": samples,
          "vocab_size": vocab_size, "seq_len": seq_len, "batch_size": batch_size,
          "steps": steps, "data_seed": data_seed, "sample_seed": sample_seed,
          "sample_temperature": float(sample_temperature), "temperature": 1.0,
          "logprob_dtype": logprob_dtype, "layout": fields,
          "record_bytes": record_bytes(fields), "bytes_per_token": record_bytes(fields) / seq_len,
          "shard_steps": shard_steps, "num_shards": -(-steps // shard_steps),
          "teacher": teacher or {"hash": ""}, "data_hash": data_hash}


def plan(config: Any, workdir: str, *, top_k: int, samples: int = 0,
         logprob_dtype: str = "float16", shard_steps: int = 0, steps: int | None = None,
         batch_size: int | None = None) -> dict[str, Any]:
  """The manifest of the cache `config` asks for: by default over the distilled phase's training
  batches (`steps` and `batch_size` override them, e.g. for a cache of the eval batches); the
  samples, if any, are drawn at config.distill.temperature."""
  d = config.data
  return new_manifest(
      top_k=top_k, samples=samples, vocab_size=vocab_size(config), seq_len=int(d.seq_len),
      batch_size=int(d.batch_size if batch_size is None else batch_size),
      steps=int(config.student_train.steps if steps is None else steps),
      data_seed=int(config.seed) + 1, sample_seed=int(config.seed),
      sample_temperature=float(config.distill.temperature),
      logprob_dtype=logprob_dtype, shard_steps=shard_steps,
      teacher=teacher_fingerprint(config, workdir), data_hash=data_fingerprint(config))
