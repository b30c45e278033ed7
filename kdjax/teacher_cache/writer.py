"""Building a teacher cache: the teacher's targets per batch, and the files that hold them.

Shape letters (the glossary is in kdjax/__init__.py): B batch, L length, V vocab, J top-k entries
per token, E sample slots per token.

The teacher runs once over the distilled phase's training stream (the batches that phase sees at
steps 1..S with its data seed, config.seed + 1). A cache is built under `<dir>.partial/` (a shard
is renamed into place when complete, with the data iterator state after its last step beside it,
so an interrupted build resumes at the first missing shard) and renamed to `<dir>` when
complete; an existing `<dir>` is never overwritten.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from array_record.python import array_record_module

from kdjax import sharding
from kdjax.model import ModelConfig, Transformer
from kdjax.teacher_cache import estimators
from kdjax.teacher_cache import format as cache_format

# group_size:1 makes every record its own chunk: random access without decoding neighbours.
_WRITER_OPTIONS = "group_size:1"


# ---------------------------------------------------------------------------------- the targets


def _sample_targets(t_logits_BxLxV: jax.Array, *, samples: int, rng: jax.Array,
                    sample_temperature: float) -> dict[str, jax.Array]:
  """E draws per token from p_Ts, folded into distinct ids, their counts and log p_Ts."""
  t_logp_BxLxV = jax.nn.log_softmax(t_logits_BxLxV / sample_temperature, axis=-1)
  b, l, _ = t_logp_BxLxV.shape
  cdf_BxLxV = jnp.cumsum(jnp.exp(t_logp_BxLxV), axis=-1)
  # u in [0, cdf[-1]): float32 rounding of the cumulative sum can never pick a p = 0 id past it.
  u_BxLxE = jax.random.uniform(rng, (b, l, samples)) * cdf_BxLxV[..., -1:]
  draws_BxLxE = jax.vmap(jax.vmap(lambda c, u: jnp.searchsorted(c, u, side="right")))(
      cdf_BxLxV, u_BxLxE).astype(jnp.int32)
  draws_BxLxE = jnp.sort(draws_BxLxE, axis=-1)
  first_BxLxE = jnp.concatenate([jnp.ones((b, l, 1), bool),
                                 draws_BxLxE[..., 1:] != draws_BxLxE[..., :-1]], axis=-1)
  slot_BxLxE = jnp.cumsum(first_BxLxE, axis=-1) - 1  # distinct ids fill slots 0, 1, ...
  where = (jnp.arange(b)[:, None, None], jnp.arange(l)[None, :, None], slot_BxLxE)
  ids_BxLxE = jnp.zeros((b, l, samples), jnp.int32).at[where].set(draws_BxLxE)
  counts_BxLxE = jnp.zeros((b, l, samples), jnp.int32).at[where].add(1)
  logprobs_BxLxE = jnp.where(counts_BxLxE > 0,
                             jnp.take_along_axis(t_logp_BxLxV, ids_BxLxE, axis=-1), 0.0)
  return {estimators.SAMPLE_IDS: ids_BxLxE, estimators.SAMPLE_COUNTS: counts_BxLxE,
          estimators.SAMPLE_LOGPROBS: logprobs_BxLxE}


def compute_targets(t_logits_BxLxV: jax.Array, *, top_k: int, samples: int = 0,
                    rng: jax.Array | None = None,
                    sample_temperature: float = 1.0) -> dict[str, jax.Array]:
  """What a cache stores for a batch, from the teacher's logits (jittable; float32 inside).

  The top-k are of p = softmax(t_logits), at temperature 1. Sampling draws E = `samples` ids
  i.i.d. from p_Ts = softmax(t_logits / sample_temperature) per token by inverting its CDF at E
  uniform points (memory B x L x (V + E), not the B x L x E x V of Gumbel draws); ids with
  p = 0 are never drawn. The draws are then folded into distinct ids and counts.
  """
  t_logits_BxLxV = t_logits_BxLxV.astype(jnp.float32)
  t_logp_BxLxV = jax.nn.log_softmax(t_logits_BxLxV, axis=-1)
  out = {}
  if top_k:
    logprobs_BxLxJ, ids_BxLxJ = jax.lax.top_k(t_logp_BxLxV, top_k)
    out.update({estimators.TOPK_IDS: ids_BxLxJ, estimators.TOPK_LOGPROBS: logprobs_BxLxJ,
                estimators.RESIDUAL: estimators.complement_logsumexp(t_logp_BxLxV, ids_BxLxJ)})
  if samples:
    out.update(_sample_targets(t_logits_BxLxV, samples=samples, rng=rng,
                               sample_temperature=sample_temperature))
  return out


def make_targets_fn(t_cfg: ModelConfig, t_params: Any, mesh, t_rules=None, *, top_k: int,
                    samples: int, vocab_size: int, sample_seed: int,
                    sample_temperature: float = 1.0):
  """`targets(batch, step)`: the cache arrays of a host batch (device arrays, not yet fetched).

  The teacher runs as in the training step (its plain logits under its own activation rules, a
  constant under stop_gradient), jitted under `mesh` with the batch split over (data, fsdp) as in
  evaluation. Its logits are cut to `vocab_size` as losses.shared_vocab cuts them for the live
  loss. The sampling key is folded with the step, so a resumed build draws exactly what an
  uninterrupted one would.
  """
  t_model = Transformer(t_cfg)

  @jax.jit
  def targets(params, batch, step):
    with sharding.activation_rules(t_rules):
      t_logits_BxLxV = t_model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                                     batch["positions"])
    t_logits_BxLxV = jax.lax.stop_gradient(t_logits_BxLxV)[..., :vocab_size]
    rng = jax.random.fold_in(jax.random.key(sample_seed), step)
    return compute_targets(t_logits_BxLxV, top_k=top_k, samples=samples, rng=rng,
                           sample_temperature=sample_temperature)

  def run(batch: dict[str, np.ndarray], step: int):
    placed = {k: sharding.global_array(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
    with jax.set_mesh(mesh):
      return targets(t_params, placed, np.int32(step))

  return run


# ---------------------------------------------------------------------------------- the files


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
          raise cache_format.CacheMismatch(
              f"{self.partial} holds an unfinished cache with other settings; "
              "delete it to start this one.")
    else:
      _write_json(plan_path, manifest)
    done = self._resume()
    self.start_step = done * manifest["shard_steps"]
    self.data_state = None
    if done:
      with open(self._shard_files(done - 1)[1]) as f:
        self.data_state = json.load(f)
    self._writer = None

  def _resume(self) -> int:
    """How many leading shards are complete; deletes every other shard file."""
    done = 0
    while done < self.manifest["num_shards"] and all(
        os.path.exists(p) for p in self._shard_files(done)):
      done += 1
    for name in os.listdir(self.partial):  # a half-written shard, or shards past a gap
      if name.startswith("cache-") and not any(
          name == os.path.basename(p) for i in range(done) for p in self._shard_files(i)):
        os.remove(os.path.join(self.partial, name))
    return done

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
    for record in cache_format.encode_rows(step, batch, targets, self.manifest["layout"]):
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
