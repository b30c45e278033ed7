"""Offline teacher cache: the teacher's top-k (and sampled) log-probs per token, on disk.

Shape letters: B batch, L length, V vocab, K top-k ids, N sample slots per token.

The teacher runs once over the distilled phase's training stream (the batches that phase sees at
steps 1..S with its data seed, config.seed + 1), and training reads record (step, row) for row
`row` of batch `step` instead of running the teacher. One ArrayRecord record is one row of one
step, record index (step - 1) * B + row, so a host reads only its own rows and grain's
ArrayRecordDataSource serves the files as they are. Files hold `shard_steps` steps each.

A record is fixed-size little-endian raw arrays, in the order `manifest['layout']` lists them:

  step, row             int64          where the record belongs (a misordered file is caught)
  digest                16 x uint8     blake2b of the row's inputs, targets and segment ids
  topk_ids              L x K          uint16 (uint32 past 65536 ids), sorted by probability
  topk_logprobs         L x K          log p_v at T = 1, float16 (default) or float32
  residual              L float32      log(1 - sum of the top-k p): the tail's log-mass
  sample_ids            L x N          distinct ids among N draws from p_Ts (slots past them: 0)
  sample_counts         L x N          how often each was drawn (0 = an unused slot)
  sample_logprobs       L x N          log p_Ts of the sampled ids (0 on unused slots)

(sample_* only with samples > 0; p_Ts is the teacher at the manifest's sample_temperature, the
training temperature the 'sampled' estimator is unbiased for.) No pickle anywhere: manifest.json
says how to read the bytes.

Why float16 log-probs: it halves the dominant cost (2 + 2 bytes per cached id instead of 2 + 4)
and its rounding is relative to |log p|: |d log p| <= 2^-11 |log p|, so an id with p = 1e-3
gets p off by 0.3%; top ids (log p near 0) are nearly exact. The tail's log-mass is one float32
per token, computed as a log-sum-exp over the ids outside the top-k (no cancellation when the
top-k hold nearly all the mass).

Reading: `TeacherCache(path).batch(step, tokens=batch)` gives step `step`'s arrays (the t_* keys
of cache_losses) after checking them against the batch; `CachedBatches(stream, cache)` is the
training stream with them added to every batch, its state resumable like the stream's.

A cache is built under `<dir>.partial/` (a shard is renamed into place when complete, with the
data iterator state after its last step beside it, so an interrupted build resumes at the first
missing shard) and renamed to `<dir>` when complete; an existing `<dir>` is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from array_record.python import array_record_module

from kdjax import cache_losses

FORMAT = "kdjax-teacher-cache"
VERSION = 1
_HEADER = (("step", "<i8", ()), ("row", "<i8", ()), ("digest", "|u1", (16,)))
# Record fields (without the header) and the keys TeacherCache.batch returns them under.
_KEYS = {"topk_ids": cache_losses.TOPK_IDS, "topk_logprobs": cache_losses.TOPK_LOGPROBS,
         "residual": cache_losses.RESIDUAL, "sample_ids": cache_losses.SAMPLE_IDS,
         "sample_counts": cache_losses.SAMPLE_COUNTS,
         "sample_logprobs": cache_losses.SAMPLE_LOGPROBS}
_LOGPROB_DTYPES = {"float16": "<f2", "float32": "<f4"}
# group_size:1 makes every record its own chunk: random access without decoding neighbours.
_WRITER_OPTIONS = "group_size:1"


class CacheMismatch(ValueError):
  """The cache does not belong to this run: other batches, teacher, or settings."""


# ---------------------------------------------------------------------------------- the targets


def compute_targets(t_logits_BxLxV: jax.Array, *, top_k: int, samples: int = 0,
                    rng: jax.Array | None = None,
                    sample_temperature: float = 1.0) -> dict[str, jax.Array]:
  """What a cache stores for a batch, from the teacher's logits (jittable; float32 inside).

  The top-k are of p = softmax(t_logits), at temperature 1. Sampling draws N = `samples` ids
  i.i.d. from p_Ts = softmax(t_logits / sample_temperature) per token by inverting its CDF at N
  uniform points (memory B x L x (V + N), not the B x L x N x V of Gumbel draws); ids with
  p = 0 are never drawn. The draws are then folded into distinct ids and counts.
  """
  t_logits_BxLxV = t_logits_BxLxV.astype(jnp.float32)
  t_logp_BxLxV = jax.nn.log_softmax(t_logits_BxLxV, axis=-1)
  out = {}
  if top_k:
    logprobs_BxLxK, ids_BxLxK = jax.lax.top_k(t_logp_BxLxV, top_k)
    out.update({cache_losses.TOPK_IDS: ids_BxLxK, cache_losses.TOPK_LOGPROBS: logprobs_BxLxK,
                cache_losses.RESIDUAL: cache_losses.complement_logsumexp(t_logp_BxLxV,
                                                                         ids_BxLxK)})
  if samples:
    t_logp_BxLxV = jax.nn.log_softmax(t_logits_BxLxV / sample_temperature, axis=-1)
    b, l, _ = t_logp_BxLxV.shape
    cdf_BxLxV = jnp.cumsum(jnp.exp(t_logp_BxLxV), axis=-1)
    # u in [0, cdf[-1]): float32 rounding of the cumulative sum can never pick a p = 0 id past it.
    u_BxLxN = jax.random.uniform(rng, (b, l, samples)) * cdf_BxLxV[..., -1:]
    draws_BxLxN = jax.vmap(jax.vmap(lambda c, u: jnp.searchsorted(c, u, side="right")))(
        cdf_BxLxV, u_BxLxN).astype(jnp.int32)
    draws_BxLxN = jnp.sort(draws_BxLxN, axis=-1)
    first_BxLxN = jnp.concatenate([jnp.ones((b, l, 1), bool),
                                   draws_BxLxN[..., 1:] != draws_BxLxN[..., :-1]], axis=-1)
    slot_BxLxN = jnp.cumsum(first_BxLxN, axis=-1) - 1  # distinct ids fill slots 0, 1, ...
    where = (jnp.arange(b)[:, None, None], jnp.arange(l)[None, :, None], slot_BxLxN)
    ids_BxLxN = jnp.zeros((b, l, samples), jnp.int32).at[where].set(draws_BxLxN)
    counts_BxLxN = jnp.zeros((b, l, samples), jnp.int32).at[where].add(1)
    logprobs_BxLxN = jnp.where(counts_BxLxN > 0,
                               jnp.take_along_axis(t_logp_BxLxV, ids_BxLxN, axis=-1), 0.0)
    out.update({cache_losses.SAMPLE_IDS: ids_BxLxN, cache_losses.SAMPLE_COUNTS: counts_BxLxN,
                cache_losses.SAMPLE_LOGPROBS: logprobs_BxLxN})
  return out


def make_targets_fn(t_cfg, t_params: Any, mesh, t_rules=None, *, top_k: int, samples: int,
                    vocab_size: int, sample_seed: int, sample_temperature: float = 1.0):
  """`targets(batch, step)`: the cache arrays of a host batch (device arrays, not yet fetched).

  The teacher runs as in the training step (train.make_teacher_forward, its own activation
  rules), jitted under `mesh` with the batch split over (data, fsdp) as in evaluation. Its logits
  are cut to `vocab_size` as losses.shared_vocab cuts them for the live loss. The sampling key is
  folded with the step, so a resumed build draws exactly what an uninterrupted one would.
  """
  # Imported here: the training code may import this module for the reader, and train.py
  # importing it at the top would then be circular.
  from kdjax import evaluate, train

  forward = train.make_teacher_forward(t_cfg, t_rules)
  placement = evaluate.Placement(mesh)

  @jax.jit
  def targets(params, batch, step):
    t_logits_BxLxV = forward(params, batch)[..., :vocab_size]
    rng = jax.random.fold_in(jax.random.key(sample_seed), step)
    return compute_targets(t_logits_BxLxV, top_k=top_k, samples=samples, rng=rng,
                           sample_temperature=sample_temperature)

  def run(batch: dict[str, np.ndarray], step: int):
    with jax.set_mesh(mesh):
      return targets(t_params, placement.batch(batch), np.int32(step))

  return run


# ---------------------------------------------------------------------------------- the format


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
  needs = cache_losses.NEEDS[estimator] if estimator else tuple(_KEYS.values())
  fields = [f for f in manifest["layout"] if f[0] not in _KEYS or _KEYS[f[0]] in needs]
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
      value = values[name] if name in values else targets[_KEYS[name]][r]
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


def host_rows(batch_size: int, process_index: int, process_count: int) -> range:
  """The global rows process `process_index` holds (data/hosts.py stacks streams in order)."""
  per = batch_size // process_count
  return range(process_index * per, (process_index + 1) * per)


# ---------------------------------------------------------------------------------- fingerprints


def _sha(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def teacher_fingerprint(config: Any, workdir: str) -> dict[str, Any]:
  """Which teacher a cache comes from, as far as the config tells without loading it: its
  shapes, how it runs (frozen_teacher dtypes) and its source (path and latest checkpoint step)."""
  if config.get("teacher_hf"):
    source = {"teacher_hf": os.path.abspath(config.teacher_hf)}
  else:
    given = config.get("teacher_checkpoint")
    directory = given or os.path.join(workdir, "teacher", "checkpoints")
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(
        directory) else []
    # A workdir's own teacher is named relative to it, so a moved workdir keeps its caches.
    source = {"teacher_checkpoint": os.path.abspath(given) if given else "<workdir>/teacher",
              "step": max(steps) if steps else None}
  frozen = config.get("frozen_teacher", {})
  described = {"teacher": config.teacher.to_dict(), "source": source,
               "dtype": frozen.get("dtype", ""), "param_dtype": frozen.get("param_dtype", "")}
  return {**described, "hash": _sha(described)}


_TRAIN_DATA_FIELDS = ("name", "train_split", "text_key", "tokenizer_path", "vocab_size",
                      "seq_len", "batch_size", "num_shards", "tokenizer_max_documents")


def data_fingerprint(config: Any) -> str:
  """Hash of the data settings that decide the training batches (not where files live)."""
  return _sha({k: config.data.get(k) for k in _TRAIN_DATA_FIELDS})


def vocab_size(config: Any) -> int:
  """The ids the soft loss compares (losses.shared_vocab): the smaller of the two models'."""
  return min(int(config.teacher.vocab_size), int(config.student.vocab_size))


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


# ---------------------------------------------------------------------------------- writing


def _shard_name(i: int, n: int) -> str:
  return f"cache-{i:05d}-of-{n:05d}.array_record"


def _write_json(path: str, value: Any) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


class CacheWriter:
  """Writes steps 1..S of the cache `manifest` describes into `directory`, resumably.

  `start_step` and `data_state` say where an interrupted build left off (0 and None for a new
  one); the caller feeds steps start_step + 1 .. S to `add` in order, then calls `finish`.
  """

  def __init__(self, directory: str, manifest: dict[str, Any]):
    self.directory = os.path.abspath(directory)
    if os.path.exists(self.directory):
      raise FileExistsError(f"{self.directory} exists; a teacher cache is never overwritten. "
                            "Delete it or choose another --workdir / --top_k.")
    self.manifest = manifest
    self.partial = self.directory + ".partial"
    os.makedirs(self.partial, exist_ok=True)
    plan_path = os.path.join(self.partial, "plan.json")
    if os.path.exists(plan_path):
      with open(plan_path) as f:
        if json.load(f) != manifest:
          raise CacheMismatch(f"{self.partial} holds an unfinished cache with other settings; "
                              "delete it to start this one.")
    else:
      _write_json(plan_path, manifest)
    n, per = manifest["num_shards"], manifest["shard_steps"]
    done = 0
    while done < n and all(os.path.exists(p) for p in self._shard_files(done)):
      done += 1
    for name in os.listdir(self.partial):  # a half-written shard, or shards past a gap
      if name.startswith("cache-") and not any(
          name == os.path.basename(p) for i in range(done) for p in self._shard_files(i)):
        os.remove(os.path.join(self.partial, name))
    self.start_step = done * per
    self.data_state = None
    if done:
      with open(self._shard_files(done - 1)[1]) as f:
        self.data_state = json.load(f)
    self._writer = None

  def _shard_files(self, i: int) -> tuple[str, str]:
    name = os.path.join(self.partial, _shard_name(i, self.manifest["num_shards"]))
    return name, os.path.join(self.partial, f"cache-{i:05d}.state.json")

  def is_shard_end(self, step: int) -> bool:
    return step % self.manifest["shard_steps"] == 0 or step == self.manifest["steps"]

  def add(self, step: int, batch: dict[str, np.ndarray], targets: dict[str, Any],
          data_state: Any = None) -> None:
    """Writes step `step`; at a shard's last step `data_state` (the data iterator's state after
    this step's batch) must be given, so that a resumed build continues from there."""
    shard = (step - 1) // self.manifest["shard_steps"]
    if self._writer is None:
      self._writer = array_record_module.ArrayRecordWriter(self._shard_files(shard)[0] + ".tmp",
                                                    _WRITER_OPTIONS)
    targets = {k: np.asarray(v) for k, v in targets.items()}
    for record in encode_rows(step, batch, targets, self.manifest["layout"]):
      self._writer.write(record)
    if self.is_shard_end(step):
      self._writer.close()
      self._writer = None
      path, state_path = self._shard_files(shard)
      os.replace(path + ".tmp", path)
      _write_json(state_path, data_state)

  def finish(self) -> dict[str, Any]:
    """Renames the complete cache into place; returns its manifest."""
    n = self.manifest["num_shards"]
    shards = [os.path.basename(self._shard_files(i)[0]) for i in range(n)]
    missing = [s for s in shards if not os.path.exists(os.path.join(self.partial, s))]
    if missing:
      raise RuntimeError(f"{self.partial}: shards {missing} were not written")
    disk = sum(os.path.getsize(os.path.join(self.partial, s)) for s in shards)
    tokens = self.manifest["steps"] * self.manifest["batch_size"] * self.manifest["seq_len"]
    manifest = dict(self.manifest, shards=shards, disk_bytes_per_token=disk / tokens)
    _write_json(os.path.join(self.partial, "manifest.json"), manifest)
    os.rename(self.partial, self.directory)  # the one step that makes the cache exist
    for path in [self._shard_files(i)[1] for i in range(n)] + ["plan.json"]:
      os.remove(os.path.join(self.directory, os.path.basename(path)))  # build-only files
    return manifest


def build(directory: str, manifest: dict[str, Any], make_iter: Callable[[], Iterator],
          targets_fn: Callable[[dict[str, np.ndarray], int], dict[str, Any]],
          log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
  """Runs `targets_fn(batch, step)` (the teacher) on steps 1..S of `make_iter()` and writes them.

  `make_iter()` is the training stream (with get/set_state). The targets of step s + 1 are
  dispatched before step s is fetched and written, so the device never waits on the disk.
  """
  writer = CacheWriter(directory, manifest)
  data = make_iter()
  if writer.data_state is not None:
    data.set_state(writer.data_state)
    log(f"resuming {directory} at step {writer.start_step + 1}")
  pending = None
  for step in range(writer.start_step + 1, manifest["steps"] + 1):
    batch = next(data)
    state = data.get_state() if writer.is_shard_end(step) else None
    out = targets_fn(batch, step)  # asynchronous: the device works while the host writes
    if pending is not None:
      writer.add(*pending)
    pending = (step, batch, out, state)
    if step % 100 == 0:
      log(f"step {step}/{manifest['steps']}")
  if pending is not None:
    writer.add(*pending)
  return writer.finish()


# ---------------------------------------------------------------------------------- reading


class TeacherCache:
  """A finished cache: `batch(step)` gives the teacher arrays of training step `step`.

    cache = TeacherCache(path)
    cache.check_config(config, workdir)      # once, before training: the right teacher & data
    t = cache.batch(step, tokens=batch)      # every step: raises CacheMismatch if misaligned
  """

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    manifest_path = os.path.join(self.path, "manifest.json")
    if not os.path.isfile(manifest_path):
      raise FileNotFoundError(f"{manifest_path} not found; build the cache with "
                              "scripts/cache_teacher.py (an unfinished build has no manifest).")
    with open(manifest_path) as f:
      self.manifest = json.load(f)
    if (self.manifest.get("format"), self.manifest.get("version")) != (FORMAT, VERSION):
      raise CacheMismatch(f"{manifest_path} is not a {FORMAT} v{VERSION} manifest")
    m = self.manifest
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
    return [decode_record(record, self.fields) for record in raw]

  def batch(self, step: int, tokens: dict[str, np.ndarray] | None = None,
            rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """{t_topk_ids, t_topk_logprobs, t_residual, [t_sample_*]}: R x L (x K) arrays of `rows`
    (default: all B rows) of step `step`, in their stored dtypes.

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
      digests = row_digests(tokens)
      if digests.shape[0] != len(rows):
        raise ValueError(f"{digests.shape[0]} token rows for {len(rows)} cache rows")
      for i, (r, rec) in enumerate(zip(rows, decoded)):
        if not np.array_equal(digests[i], rec["digest"]):
          raise CacheMismatch(
              f"teacher cache {self.path}: step {step} row {r} was computed on other tokens "
              "than this batch. The cache must be built from the same data, seed "
              f"(config.seed + 1 = {self.manifest['data_seed']}) and batch shape as the run "
              "that reads it, and read with the step the batch belongs to.")
    names = [f[0] for f in self.fields if f[0] in _KEYS]
    return {_KEYS[n]: np.stack([rec[n] for rec in decoded]) for n in names}

  def check_config(self, config: Any, workdir: str, estimator: str | None = None) -> None:
    """Raises CacheMismatch unless this cache fits the distilled phase `config` runs with the
    soft loss `estimator` (default: config.distill.cache_estimator, if the config has it)."""
    m = self.manifest
    estimator = estimator or config.distill.get("cache_estimator") or None
    want = {"data_seed": int(config.seed) + 1, "seq_len": int(config.data.seq_len),
            "batch_size": int(config.data.batch_size), "vocab_size": vocab_size(config),
            "data_hash": data_fingerprint(config),
            "teacher": teacher_fingerprint(config, workdir)["hash"]}
    if estimator == "sampled":  # unbiased only at the temperature the draws were made at
      want["sample_temperature"] = float(config.distill.temperature)
    have = dict(m, teacher=m["teacher"]["hash"])
    wrong = [f"{k}: cache {have[k]!r}, config {v!r}" for k, v in want.items() if have[k] != v]
    if m["steps"] < int(config.student_train.steps):
      wrong.append(f"steps: cache {m['steps']}, config.student_train.steps "
                   f"{config.student_train.steps}")
    if estimator is not None:
      if estimator not in cache_losses.NEEDS:
        raise CacheMismatch(f"unknown cache estimator {estimator!r}; choose one of: "
                            f"{', '.join(cache_losses.NEEDS)}")
      stored = {_KEYS[f[0]] for f in self.fields if f[0] in _KEYS}
      missing = [k for k in cache_losses.NEEDS[estimator] if k not in stored]
      if missing:
        wrong.append(f"estimator {estimator!r} needs {', '.join(missing)}, which the cache "
                     "lacks (build it with --estimator_samples for 'sampled')")
    if wrong:
      raise CacheMismatch(f"teacher cache {self.path} does not fit this run ({'; '.join(wrong)})"
                          "; rebuild it with scripts/cache_teacher.py for this config.")


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
