"""Offline teacher cache: the teacher's top-k (and sampled) log-probs per token, on disk.

A distilled phase normally runs the teacher inside every training step. With a cache the teacher
runs once, ahead of training, over exactly the batches that phase will see (steps 1..S of its
training stream, data seed config.seed + 1), and the step reads record (step, row) for row `row`
of batch `step` instead of running the teacher: no teacher params on the devices, no teacher
FLOPs per step. What is kept per token is a compression of the teacher's distribution, so the
soft loss becomes an estimate of the live one (the estimators below).

On disk, a cache is a directory:

  manifest.json                             how to read the bytes (layout, dtypes), what the
                                            cache was built from (teacher and data fingerprints,
                                            seeds, temperature) and its size; no pickle anywhere
  cache-NNNNN-of-MMMMM.array_record         `shard_steps` steps each; one record per row of a
                                            step, record index (step - 1) * B + row, so a host
                                            reads only its own rows and grain's
                                            ArrayRecordDataSource serves the files as they are

The soft loss against it (estimators.py) is one of three estimators of T^2 KL(p_t || p_s):
'topk_renorm' (both sides restricted to the teacher's top-k and renormalised), 'topk_residual'
(the top-k plus one bucket for the tail's mass) and 'sampled' (ids drawn from the tempered
teacher, with their counts: unbiased at the temperature they were drawn at).

The package, one concern per module:

  format.py      the record layout, encoding and decoding, digests, manifest and fingerprints
  writer.py      the teacher's targets per batch, and CacheWriter / build (resumable)
  reader.py      TeacherCache (checked reads of one step) and CachedBatches (the stream + cache)
  estimators.py  the soft losses against a cached teacher

It needs the model, never the training step: the teacher's forward in writer.py is the model's
plain logits under stop_gradient, as the step computes them. Build one with
scripts/cache_teacher.py; train from it with config.distill.teacher_cache.
"""

from kdjax.teacher_cache import estimators
from kdjax.teacher_cache.format import (FIELD_KEYS, FORMAT, VERSION, CacheMismatch,
                                        bytes_per_token, data_fingerprint, decode_record,
                                        encode_rows, layout, new_manifest, plan, record_bytes,
                                        row_digests, teacher_fingerprint, vocab_size)
from kdjax.teacher_cache.reader import CachedBatches, TeacherCache, host_rows
from kdjax.teacher_cache.writer import CacheWriter, build, compute_targets, make_targets_fn

__all__ = [
    "FIELD_KEYS", "FORMAT", "VERSION", "CacheMismatch", "CacheWriter", "CachedBatches",
    "TeacherCache", "build", "bytes_per_token", "compute_targets", "data_fingerprint",
    "decode_record", "encode_rows", "estimators", "host_rows", "layout", "make_targets_fn",
    "new_manifest", "plan", "record_bytes", "row_digests", "teacher_fingerprint", "vocab_size",
]
