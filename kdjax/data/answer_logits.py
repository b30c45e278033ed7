"""A teacher's log-probs recorded at its answers' tokens, attached to the answers as they are
encoded, so that they ride through packing to the loss with no teacher in the step.

scripts/teacher_answers.py --record_topk=J writes, next to answers.jsonl (whose line k carries
`answer_id` k):

  topk_manifest.json   what the records hold and who wrote them (format, layout, top_k, vocab)
  topk.array_record    record k for line k, in kdjax.teacher_cache's record layout with
                       L = max_new_tokens:
                         step     k, the answer's line
                         row      n, how many new ids are recorded (the answer through its stop)
                         digest   blake2b-128 of those n ids (int32 little-endian)
                         topk_ids, topk_logprobs  L x J; residual L: at new id a < n, the
                                  teacher's top-k log-probs (temperature 1) where it drew that
                                  id, and the log-mass outside them

An encoded document (kdjax.data.encoding) gets, per target position, the estimators' keys
t_topk_ids [n, J], t_topk_logprobs [n, J], t_residual [n] and t_weight [n] (1 where the target
is a recorded answer id). The answer is found by its ids: the recorded ids must start the
document's last answer span (a completion's tokens, or the last assistant turn's). Where they do
not (an answer text that re-tokenizes differently) or a record has no answer_id (ground truth
mixed in), t_weight stays 0 and only the cross-entropy sees those tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from kdjax.data.records import DataError, where
from kdjax.teacher_cache import estimators
from kdjax.teacher_cache import format as cache_format

FORMAT = "kdjax-answer-topk"
VERSION = 1
MANIFEST, RECORDS = "topk_manifest.json", "topk.array_record"
ANSWER_ID = "answer_id"  # the field of an answer record that names its line
FEATURES = (estimators.TOPK_IDS, estimators.TOPK_LOGPROBS, estimators.RESIDUAL,
            estimators.TEACHER_WEIGHT)


def is_answers_dir(path: str) -> bool:
  return bool(path) and os.path.isfile(os.path.join(path, MANIFEST))


def ids_digest(ids) -> np.ndarray:
  h = hashlib.blake2b(np.ascontiguousarray(ids, "<i4").tobytes(), digest_size=16)
  return np.frombuffer(h.digest(), np.uint8)


def new_manifest(*, top_k: int, vocab_size: int, max_new_tokens: int,
                 logprob_dtype: str = "float16", teacher: dict | None = None) -> dict[str, Any]:
  fields = cache_format.layout(seq_len=max_new_tokens, top_k=top_k, samples=0,
                               vocab_size=vocab_size, logprob_dtype=logprob_dtype)
  return {"format": FORMAT, "version": VERSION, "top_k": top_k, "vocab_size": vocab_size,
          "max_new_tokens": max_new_tokens, "temperature": 1.0, "logprob_dtype": logprob_dtype,
          "layout": fields, "teacher": teacher or {}}


def encode(line: int, n: int, digest: np.ndarray, topk: Mapping[str, np.ndarray],
           manifest: Mapping[str, Any]) -> bytes:
  """Record `line` of topk.array_record: the recorded distributions at n new ids whose
  ids_digest is `digest`."""
  values = {"step": line, "row": n, "digest": digest}
  parts = []
  for name, dtype, shape in manifest["layout"]:
    if name in values:
      value = np.broadcast_to(np.asarray(values[name]).astype(dtype), shape)
    else:
      value = np.zeros(shape, dtype)
      given = np.asarray(topk[cache_format.FIELD_KEYS[name]][:n])
      value[:n] = given.astype(np.float32).astype(dtype) if dtype.startswith("<f") else given
    parts.append(np.ascontiguousarray(value).tobytes())
  return b"".join(parts)


class AnswerLogits:
  """The recorded top-k of one answers directory; `attach` adds them to encoded documents."""

  def __init__(self, directory: str):
    path = os.path.join(directory, MANIFEST)
    try:
      with open(path) as f:
        self.manifest = json.load(f)
    except (OSError, ValueError) as e:
      raise DataError(f"{path}: cannot read the recorded answer log-probs ({e}); rewrite them "
                      "with scripts/teacher_answers.py --record_topk.") from None
    if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
      raise DataError(f"{path}: not kdjax answer log-probs of version {VERSION}; rewrite them "
                      "with scripts/teacher_answers.py --record_topk.")
    self.directory = directory
    self.top_k = int(self.manifest["top_k"])
    self.vocab_size = int(self.manifest["vocab_size"])
    self._fields = self.manifest["layout"]
    self._source = grain.sources.ArrayRecordDataSource([os.path.join(directory, RECORDS)])

  def __len__(self) -> int:
    return len(self._source)

  def record(self, line: int) -> dict[str, np.ndarray]:
    fields = cache_format.decode_record(self._source[line], self._fields)
    if int(fields["step"]) != line:
      raise DataError(f"{self.directory}: record {line} holds line {int(fields['step'])}; the "
                      "files are out of order, rewrite them.")
    return fields

  def empty(self, length: int) -> dict[str, np.ndarray]:
    j = self.top_k
    return {estimators.TOPK_IDS: np.zeros((length, j), np.int32),
            estimators.TOPK_LOGPROBS: np.zeros((length, j), np.float32),
            estimators.RESIDUAL: np.zeros((length,), np.float32),
            estimators.TEACHER_WEIGHT: np.zeros((length,), np.float32)}

  def attach(self, record: Mapping[str, Any], ids: list[int],
             answers: np.ndarray) -> dict[str, np.ndarray]:
    """The features of a document of `ids` whose answer ids are `answers` == 1 (per id)."""
    out = self.empty(len(ids) - 1)
    line = record.get(ANSWER_ID)
    if line is None:
      return out
    if not isinstance(line, int) or not 0 <= line < len(self):
      raise DataError(f"{where(record)}: {ANSWER_ID}={line!r} names no record of "
                      f"{self.directory}; the answers and their log-probs are from different "
                      "runs, rewrite them together.")
    rec = self.record(line)
    n, start = int(rec["row"]), _last_span_start(answers)
    if start is None or start + n > len(ids) or not np.array_equal(
        ids_digest(ids[start:start + n]), rec["digest"]):
      return out
    at = slice(start - 1, start - 1 + n)  # id i is the target of position i - 1
    out[estimators.TOPK_IDS][at] = rec["topk_ids"][:n]
    out[estimators.TOPK_LOGPROBS][at] = rec["topk_logprobs"][:n].astype(np.float32)
    out[estimators.RESIDUAL][at] = rec["residual"][:n]
    out[estimators.TEACHER_WEIGHT][at] = 1.0
    return out


def _last_span_start(answers: np.ndarray) -> int | None:
  """Where the last run of answer ids starts (None without one; id 0 is never a target)."""
  on = np.flatnonzero(answers)
  if not len(on):
    return None
  breaks = np.flatnonzero(np.diff(on) > 1)
  start = int(on[breaks[-1] + 1]) if len(breaks) else int(on[0])
  return start if start > 0 else None
