"""Orbax checkpoints of one training phase, and read-only loading of a teacher's params.

A checkpoint holds four items, so each can be restored on its own:
  params  the model params (all a teacher load needs)
  train   step, optimizer state and RNG (and the feature projection, TrainState.aux_params, which
          is trained but never exported: kdjax.features)
  data    the grain iterator state (JSON), so a resumed run sees the same batches
  config  the run's config (JSON), for the record
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from kdjax.cli import one_line
from kdjax.state import TrainState

ITEMS = ("params", "train", "data", "config")
# Words of tensorstore's and orbax's errors that say the bytes themselves are bad (DATA_LOSS is
# absl's status for corrupted or truncated data), as opposed to failing to reach them.
# OUT_OF_RANGE: a read past the end of a file cut short.
_DAMAGE_WORDS = ("DATA_LOSS", "OUT_OF_RANGE", "corrupt", "truncat", "Unexpected end",
                 "Error decoding", "Expecting value", "Expecting property name")
# Orbax's words for a saved tree whose structure is not the state's: intact, but another layout.
_LAYOUT_WORDS = ("tree structures do not match",)
# errno values of a file that is there but cannot be read or written right now.
_TRANSIENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EIO, errno.EROFS,
                     errno.EDQUOT, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EBUSY,
                     errno.ENOMEM, errno.EMFILE, errno.ENFILE}


class CheckpointUnreadable(RuntimeError):
  """A checkpoint failed to restore for a reason other than proven damage; nothing was moved."""


def _chain(error: BaseException):
  while error is not None:
    yield error
    error = error.__cause__ or error.__context__


def _agreed(reason: str | None, step: int) -> str | None:
  """Process 0's verdict on every process: all of them quarantine (a collective move) or all
  stop, or one would wait forever for the others."""
  if jax.process_count() == 1:
    return reason
  from jax.experimental import multihost_utils
  damaged = bool(multihost_utils.broadcast_one_to_all(np.asarray(reason is not None)))
  if damaged == (reason is not None):
    return reason
  return f"process 0 found checkpoint step {step} damaged" if damaged else None


def damage(step_dir: str, error: BaseException) -> str | None:
  """Why the checkpoint in `step_dir` is damaged, or None if that is not proven.

  Proof is one of: an item directory missing; a JSON metadata file that does not parse; or, with
  every file present and readable, a restore error that says the bytes are bad. An error that
  reading the files themselves reproduces (permissions, I/O, a full disk), or a transient errno
  anywhere in the error's chain, is never called damage.
  """
  if any(isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS for e in _chain(error)):
    return None
  missing = [item for item in ("params", "train", "data")
             if not os.path.isdir(os.path.join(step_dir, item))]
  if missing:
    return f"item {missing[0]!r} is missing"
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      try:
        with open(path, "rb") as f:
          content = f.read()
      except OSError:
        return None  # unreadable now: a permission or I/O problem, not proven damage
      if name.endswith("METADATA") or name.endswith(".json"):
        try:
          json.loads(content)
        except ValueError:
          return f"{os.path.relpath(path, step_dir)} is not valid JSON"
  text = " ".join(f"{type(e).__name__}: {e}" for e in _chain(error))
  if any(word in text for word in _DAMAGE_WORDS) or any(
      isinstance(e, (EOFError, json.JSONDecodeError)) for e in _chain(error)):
    return "its data does not decode"
  return None



def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, so restore places arrays directly."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def config_hash(config: dict) -> str:
  """SHA-256 of the config's canonical JSON: which exact settings produced a checkpoint."""
  return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _train_item(state: TrainState) -> dict:
  """Everything in the state but the params: step, optimizer state, RNG, NaN-guard counters,
  and aux_params where there are any (a state without them saves exactly what it always did)."""
  item = {f: getattr(state, f) for f in ("step", "opt_state", "rng", "skipped_steps",
                                       "nonfinite_streak")}
  if state.aux_params is not None:
    item["aux_params"] = state.aux_params
  return item


class PhaseCheckpoints:
  """A phase's checkpoints under `directory`: the last `max_to_keep`, plus the one with the
  lowest held-out loss among those saved with a `val_loss` metric. Saves are async."""

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    keep = pp.AnyPreservationPolicy([
        pp.LatestN(n=max_to_keep),
        # BestN keeps the tail of the sorted list: sort losses descending to keep the lowest.
        pp.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                 keep_checkpoints_without_metrics=False)])
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(preservation_policy=keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: TrainState, data_state: Any, config: dict,
           val_loss: float | None = None) -> None:
    """Saves `state` as `step` (the caller knows it: no device sync here)."""
    metrics = None if val_loss is None else {"val_loss": float(val_loss)}
    self._manager.save(step, metrics=metrics, custom_metadata={"config_sha256": config_hash(config)},
                       args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        train=ocp.args.StandardSave(_train_item(state)),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config)), force=True)

  def restore(self, step: int, state_like: TrainState, shardings: TrainState):
    """Returns (state, data_state) for `step`, placed with `shardings`."""
    target = abstract_like(state_like, shardings)
    out = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target.params),
        train=ocp.args.StandardRestore(_train_item(target)),
        data=ocp.args.JsonRestore()))
    return TrainState(params=out["params"], **out["train"]), out["data"]

  def restore_latest_valid(self, state_like: TrainState, shardings: TrainState):
    """(step, state, data_state) of the newest checkpoint that restores, or None if none exist.

    `state_like` may be abstract (state.abstract_train_state): nothing but the restored state is
    allocated. A checkpoint that fails to restore and is provably damaged (`damage`: an item
    missing, a file unparsable or cut short) is moved, whole, to
    `<phase>/corrupt_checkpoints/<step>` with a warning naming it; it is never deleted, and moving
    it lets training write that step again. Any other failure (a full disk, a permission error, a
    network filesystem hiccup) raises CheckpointUnreadable and moves nothing.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, data_state = self.restore(step, state_like, shardings)
        return step, state, data_state
      except Exception as e:  # orbax/tensorstore raise many types for damaged files
        error = f"{type(e).__name__}: {one_line(e, 200)}"
        if any(word in one_line(e) for word in _LAYOUT_WORDS):
          raise CheckpointUnreadable(
              f"checkpoint step {step} in {self.directory} holds a training state of another "
              f"layout ({error}): another kdjax version or settings that change the state wrote "
              "it; nothing was moved. Resume it with the kdjax that wrote it, or start a new "
              "--workdir.") from e
        reason = _agreed(damage(os.path.join(self.directory, str(step)), e), step)
        if reason is None:
          raise CheckpointUnreadable(
              f"checkpoint step {step} in {self.directory} could not be read ({error}) and is not "
              "damaged as far as kdjax can tell, so nothing was moved; fix the cause (disk space, "
              "permissions, the filesystem) and rerun the same command to resume.") from e
        kept = self._quarantine(step)
        print(f"warning: checkpoint step {step} in {self.directory} is damaged ({reason}; "
              f"{error}); moved it to {kept} and falling back to the previous one.",
              file=sys.stderr)
    return None

  def _quarantine(self, step: int) -> str:
    target = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints", str(step))
    if os.path.exists(target):
      target += f".{int(time.time())}"
    # On many hosts the folder is shared: process 0 moves it, the others wait until it has.
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"kdjax_quarantine_{step}")
    self._manager.reload()
    return target

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _read_only_manager(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(directory), item_names=ITEMS,
      options=ocp.CheckpointManagerOptions(read_only=True, create=False))


def saved_config(directory: str) -> dict | None:
  """The config stored with the latest checkpoint under `directory`, or None if there is none."""
  if not os.path.isdir(directory):
    return None
  manager = _read_only_manager(directory)
  config = None
  for step in sorted(manager.all_steps(), reverse=True):
    try:  # a damaged newest checkpoint is handled (moved aside) by the training loop
      config = manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))["config"]
      break
    except Exception:  # noqa: BLE001 - any unreadable step: try the previous one
      continue
  manager.close()
  return config


def best_step(directory: str) -> int | None:
  """The kept checkpoint with the lowest held-out loss (`val_loss` in the phase's metrics.jsonl,
  beside `directory`), else the latest; None if there is none."""
  manager = _read_only_manager(directory)
  steps = set(manager.all_steps())
  manager.close()
  metrics = os.path.join(os.path.dirname(os.path.abspath(directory)), "metrics.jsonl")
  losses = {}
  if os.path.isfile(metrics):
    with open(metrics) as f:
      for line in f:
        row = json.loads(line)
        if "val_loss" in row and row.get("step") in steps:
          losses[row["step"]] = row["val_loss"]
  if losses:
    return min(losses, key=lambda s: (losses[s], -s))
  return max(steps) if steps else None


def save_params(directory: str, params: Any, config: dict, step: int = 0) -> None:
  """Writes params and a config (say, {'teacher': ModelConfig fields}) as a checkpoint that
  `load_params`, `saved_config` and so config.teacher_checkpoint read; refuses to overwrite."""
  if os.path.exists(directory) and os.listdir(directory):
    raise FileExistsError(f"{directory} is not empty; choose a new directory.")
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=ITEMS,
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                             config=ocp.args.JsonSave(config)))
  manager.wait_until_finished()
  manager.close()


def load_params(directory: str, params_like: Any, shardings: Any, step: int | None = None):
  """Restores only the params of the latest (or given) checkpoint under `directory`.

  The manager is read-only: loading a teacher never creates, cleans or deletes anything there.
  """
  manager = _read_only_manager(directory)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {directory}; run that phase first, or point "
                            "config.teacher_checkpoint at a kdjax teacher's checkpoints folder.")
  logging.info("loading params of step %d from %s", step, directory)
  out = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_like(params_like, shardings))))
  manager.close()
  return out["params"], step
