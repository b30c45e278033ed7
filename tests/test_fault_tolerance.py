"""NaN/Inf guard: a non-finite step is skipped and counted; too many in a row stop the run."""

import dataclasses
import errno
import glob
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from kdjax import checkpoint, loop, optim, sharding, train
from kdjax.model import ModelConfig
from kdjax.settings import DistillSettings
from kdjax.state import create_train_state, init_params

S_CFG = ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                    mlp_dim=32, max_len=16)
T_CFG = dataclasses.replace(S_CFG, d_model=32, num_layers=2)
TC = ml_collections.ConfigDict(dict(steps=12, learning_rate=1e-2, warmup_steps=0,
                                    end_lr_fraction=1.0, weight_decay=0.1, grad_clip=1.0,
                                    b1=0.9, b2=0.95, grad_accum_steps=1))


def _batch(seed, nan_mask=False):
  rng = np.random.default_rng(seed)
  toks = rng.integers(4, 32, size=(4, 9)).astype(np.int32)
  mask = np.ones((4, 8), np.float32)
  if nan_mask:
    mask[0, 0] = np.nan  # corrupt data: the loss becomes NaN
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.ones((4, 8), np.int32),
          "positions": np.tile(np.arange(8, dtype=np.int32), (4, 1)), "mask": mask}


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def _equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_nan_teacher_logits_skip_the_update_and_are_counted(mesh):
  tx = optim.make_optimizer(TC)
  state, _ = create_train_state(S_CFG, tx, 0, mesh, sharding.DEFAULT_RULES)
  good_t = init_params(T_CFG, jax.random.key(1), mesh, sharding.DEFAULT_RULES)
  nan_t = jax.tree.map(lambda x: x * np.nan, good_t)
  step = jax.jit(train.make_train_step(S_CFG, tx, optim.make_schedule(TC), t_cfg=T_CFG,
                                       distill=DistillSettings()))
  after_nan, metrics = step(state, nan_t, _batch(0))
  assert not np.isfinite(float(metrics["loss"]))
  assert _equal(after_nan.params, state.params) and _equal(after_nan.opt_state, state.opt_state)
  assert int(after_nan.skipped_steps) == 1 and int(after_nan.nonfinite_streak) == 1
  assert int(after_nan.step) == 1  # the batch counts as consumed
  after_good, metrics = step(after_nan, good_t, _batch(1))
  assert np.isfinite(float(metrics["loss"]))
  assert not _equal(after_good.params, state.params)
  assert int(after_good.skipped_steps) == 1 and int(after_good.nonfinite_streak) == 0
  assert float(metrics["skipped_steps"]) == 1.0


class _Batches:
  """A checkpointable iterator whose batches from `bad_from` on carry a NaN."""

  def __init__(self, bad_from):
    self.i, self.bad_from = 0, bad_from

  def __next__(self):
    self.i += 1
    return _batch(self.i, nan_mask=self.i >= self.bad_from)

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_consecutive_nonfinite_steps_stop_the_run_with_the_last_checkpoint_intact(mesh, tmp_path):
  kwargs = dict(phase="scratch", phase_dir=str(tmp_path), model_cfg=S_CFG, train_cfg=TC, seed=0,
                mesh=mesh, rules=sharding.DEFAULT_RULES, tokens_per_step=32, config_dict={},
                log_every=1, checkpoint_every=2, keep_checkpoints=3, nonfinite_patience=3,
                show_progress=False)
  with pytest.raises(loop.NonFiniteError, match="3 consecutive steps up to step 7"):
    loop.train_phase(loop.PhaseSpec(make_train_iter=lambda: _Batches(bad_from=5), **kwargs))
  # Steps 5, 6, 7 were skipped; the checkpoint at step 6 holds the params of step 4.
  ckpts = checkpoint.PhaseCheckpoints(str(tmp_path / "checkpoints"))
  assert ckpts.latest_step() == 6
  tx = optim.make_optimizer(TC)
  like, shardings = create_train_state(S_CFG, tx, 0, mesh, sharding.DEFAULT_RULES)
  at6, _ = ckpts.restore(6, like, shardings)
  at4, _ = ckpts.restore(4, like, shardings)
  ckpts.close()
  assert _equal(at6.params, at4.params)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(at6.params))
  assert int(at6.skipped_steps) == 2


def _truncate_params(step_dir):
  data = sorted(glob.glob(os.path.join(step_dir, "params", "d", "*")))[0]
  with open(data, "r+b") as f:
    f.truncate(os.path.getsize(data) // 2)


def _drop_train_item(step_dir):
  shutil.rmtree(os.path.join(step_dir, "train"))


def _garble_metadata(step_dir):
  with open(os.path.join(step_dir, "params", "_METADATA"), "w") as f:
    f.write("{not json")


def _resume_kwargs(mesh):
  return dict(phase="scratch", model_cfg=S_CFG, train_cfg=TC, seed=0, mesh=mesh,
              rules=sharding.DEFAULT_RULES, tokens_per_step=32, config_dict={}, log_every=1,
              checkpoint_every=4, keep_checkpoints=5, nonfinite_patience=3, show_progress=False,
              make_train_iter=lambda: _Batches(bad_from=10**9))


@pytest.fixture(scope="module")
def whole_and_stopped(mesh, tmp_path_factory):
  """An uninterrupted run's result, and the phase dir of a run stopped right after its
  checkpoint at step 8 (each test below damages its own copy of that dir)."""
  kwargs = _resume_kwargs(mesh)
  whole = loop.train_phase(loop.PhaseSpec(phase_dir=str(tmp_path_factory.mktemp("whole")), **kwargs))
  partial_dir = tmp_path_factory.mktemp("partial")
  with pytest.raises(KeyboardInterrupt):  # stop right after the checkpoint at step 8

    class Stop(_Batches):
      def __next__(self):
        if self.i == 8:
          raise KeyboardInterrupt
        return super().__next__()

    loop.train_phase(loop.PhaseSpec(phase_dir=str(partial_dir), **dict(kwargs, make_train_iter=lambda: Stop(10**9))))
  return whole, partial_dir


@pytest.mark.parametrize("damage", [_truncate_params, _drop_train_item, _garble_metadata])
def test_damaged_latest_checkpoint_falls_back_and_is_kept(mesh, tmp_path, damage, capfd,
                                                          whole_and_stopped):
  whole, stopped_dir = whole_and_stopped
  partial_dir = tmp_path / "partial"
  shutil.copytree(stopped_dir, partial_dir)
  step8 = partial_dir / "checkpoints" / "8"
  damage(str(step8))
  files = sorted(os.path.relpath(p, step8) for p in glob.glob(f"{step8}/**", recursive=True))
  capfd.readouterr()
  resumed = loop.train_phase(loop.PhaseSpec(phase_dir=str(partial_dir), **_resume_kwargs(mesh)))
  err = capfd.readouterr().err
  assert "checkpoint step 8" in err and "corrupt_checkpoints" in err
  assert resumed.trained_steps == TC.steps - 4  # fell back to step 4
  assert _equal(resumed.params, whole.params)
  kept = partial_dir / "corrupt_checkpoints" / "8"
  assert sorted(os.path.relpath(p, kept) for p in glob.glob(f"{kept}/**", recursive=True)) == files


@pytest.mark.parametrize("error", [
    OSError(errno.EIO, "Input/output error"), PermissionError(errno.EACCES, "Permission denied"),
    OSError(errno.ENOSPC, "No space left on device")], ids=["io", "permission", "full_disk"])
def test_a_transient_read_error_stops_the_run_and_moves_nothing(mesh, tmp_path, error, monkeypatch,
                                                                whole_and_stopped):
  """A checkpoint that cannot be read right now (I/O error, permissions, a full disk) is not
  damaged: the run stops with one line naming it, and every checkpoint stays where it was."""
  _, stopped_dir = whole_and_stopped
  partial_dir = tmp_path / "partial"
  shutil.copytree(stopped_dir, partial_dir)
  before = sorted(os.path.relpath(p, partial_dir)
                  for p in glob.glob(f"{partial_dir}/**", recursive=True))

  def unreadable(self, step, state_like, shardings):
    raise error

  monkeypatch.setattr(checkpoint.PhaseCheckpoints, "restore", unreadable)
  with pytest.raises(checkpoint.CheckpointUnreadable) as raised:
    loop.train_phase(loop.PhaseSpec(phase_dir=str(partial_dir), **_resume_kwargs(mesh)))
  message = str(raised.value)
  assert "\n" not in message and "checkpoint step 8" in message and "nothing was moved" in message
  after = sorted(os.path.relpath(p, partial_dir)
                 for p in glob.glob(f"{partial_dir}/**", recursive=True))
  assert after == before and not (partial_dir / "corrupt_checkpoints").exists()


def test_resume_allocates_no_fresh_state_beside_the_restored_one(mesh, tmp_path, monkeypatch,
                                                                 whole_and_stopped):
  """Resuming restores straight into the abstract state: when the restore starts, no training
  state (params + optimizer state) has been allocated for the phase, so peak memory is one
  state, not two. The result is still the uninterrupted run's."""
  whole, stopped_dir = whole_and_stopped
  partial_dir = tmp_path / "partial"
  shutil.copytree(stopped_dir, partial_dir)
  live_bytes = lambda: sum(x.nbytes for x in jax.live_arrays())
  seen = {}
  restore = checkpoint.PhaseCheckpoints.restore

  def measured_restore(self, step, state_like, shardings):
    seen.setdefault("at_restore", live_bytes())
    return restore(self, step, state_like, shardings)

  monkeypatch.setattr(checkpoint.PhaseCheckpoints, "restore", measured_restore)
  seen["at_start"] = live_bytes()
  resumed = loop.train_phase(loop.PhaseSpec(phase_dir=str(partial_dir), **_resume_kwargs(mesh)))
  assert _equal(resumed.params, whole.params)
  params_bytes = sum(x.nbytes for x in jax.tree.leaves(resumed.params))
  assert seen["at_restore"] - seen["at_start"] < params_bytes


def test_keeps_the_last_n_plus_the_best_by_held_out_loss(mesh, tmp_path):
  losses_by_step = {2: 5.0, 4: 1.0, 6: 4.0, 8: 3.0, 10: 6.0, 12: 7.0}
  seen = []

  def val_loss(params):
    seen.append(len(seen))
    return losses_by_step[2 * len(seen)]

  loop.train_phase(loop.PhaseSpec(phase="scratch", phase_dir=str(tmp_path), model_cfg=S_CFG, train_cfg=TC, seed=0,
                 mesh=mesh, rules=sharding.DEFAULT_RULES, tokens_per_step=32, config_dict={},
                 log_every=3, checkpoint_every=2, keep_checkpoints=2, nonfinite_patience=3,
                 show_progress=False, val_loss_fn=val_loss,
                 make_train_iter=lambda: _Batches(bad_from=10**9)))
  ckpts = checkpoint.PhaseCheckpoints(str(tmp_path / "checkpoints"))
  assert sorted(ckpts._manager.all_steps()) == [4, 10, 12]  # best (step 4) + last two
  ckpts.close()
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert {r["step"]: r["val_loss"] for r in rows if "val_loss" in r} == losses_by_step
  assert sorted(r["step"] for r in rows) == [2, 3, 4, 6, 8, 9, 10, 12]  # log + checkpoint steps
