"""Checkpoint round trip, read-only params loading, and metrics.jsonl truncation on resume."""

import hashlib
import json
import os

import jax
import ml_collections
import numpy as np
import optax
import pytest

from kdjax import checkpoint, metric_log, optim, sharding, train
from kdjax.model import ModelConfig
from kdjax.state import abstract_train_state, create_train_state

CFG = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  mlp_dim=32, max_len=16)
TC = ml_collections.ConfigDict(dict(steps=10, learning_rate=1e-2, warmup_steps=0,
                                    end_lr_fraction=1.0, weight_decay=0.1, grad_clip=1.0,
                                    b1=0.9, b2=0.95, grad_accum_steps=1))


@pytest.fixture(scope="module")
def trained():
  """A state after two real updates, so optimizer moments and step are non-trivial."""
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  tx = optim.make_optimizer(TC)
  state, shardings = create_train_state(CFG, tx, 3, mesh, sharding.DEFAULT_RULES)
  step = jax.jit(train.make_train_step(CFG, tx, optim.make_schedule(TC)))
  rng = np.random.default_rng(0)
  for _ in range(2):
    toks = rng.integers(4, 32, size=(2, 9)).astype(np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
             "segment_ids": np.ones((2, 8), np.int32),
             "positions": np.tile(np.arange(8, dtype=np.int32), (2, 1)),
             "mask": np.ones((2, 8), np.float32)}
    state, _ = step(state, None, batch)
  return state, shardings, tx, mesh


def _assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_a_state_of_another_layout_is_refused_and_kept(trained, tmp_path):
  """A checkpoint whose optimizer state has another structure (another optimizer, or an older
  kdjax) is intact: restoring into this state stops with one line saying so, and moves nothing."""
  _, shardings, _, mesh = trained
  other_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  other, _ = create_train_state(CFG, other_tx, 3, mesh, sharding.DEFAULT_RULES)
  directory = tmp_path / "ckpt"
  ckpts = checkpoint.PhaseCheckpoints(str(directory))
  ckpts.save(2, other, {"i": 0}, {})
  ckpts.wait()
  files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  like, like_shardings = abstract_train_state(CFG, optim.make_optimizer(TC), 3, mesh,
                                              sharding.DEFAULT_RULES)
  with pytest.raises(checkpoint.CheckpointUnreadable, match="another layout") as raised:
    ckpts.restore_latest_valid(like, like_shardings)
  ckpts.close()
  assert "\n" not in str(raised.value) and "nothing was moved" in str(raised.value)
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == files


def test_round_trip_is_exact(trained, tmp_path):
  state, shardings, tx, mesh = trained
  data_state = {"parent_state": {"next_index": 7}, "slices": [[-1, -1]]}
  ckpts = checkpoint.PhaseCheckpoints(str(tmp_path / "ckpt"))
  ckpts.save(2, state, data_state, {"seed": 3})
  ckpts.wait()
  assert ckpts.latest_step() == 2
  fresh, _ = create_train_state(CFG, tx, 99, mesh, sharding.DEFAULT_RULES)
  restored, restored_data = ckpts.restore(2, fresh, shardings)
  ckpts.close()
  _assert_trees_equal(restored, state)
  assert restored_data == data_state
  with open(tmp_path / "ckpt" / "2" / "_CHECKPOINT_METADATA") as f:
    meta = json.load(f)
  assert meta["custom_metadata"]["config_sha256"] == hashlib.sha256(b'{"seed": 3}').hexdigest()
  assert restored.params["embed"]["embedding"].sharding == (
      shardings.params["embed"]["embedding"])


def test_load_params_is_read_only(trained, tmp_path):
  state, shardings, _, _ = trained
  directory = str(tmp_path / "teacher")
  ckpts = checkpoint.PhaseCheckpoints(directory)
  ckpts.save(2, state, {}, {})
  ckpts.wait()
  ckpts.close()
  def stamps():
    return {os.path.relpath(os.path.join(r, p), directory): os.stat(os.path.join(r, p)).st_mtime_ns
            for r, _, files in os.walk(directory) for p in files}

  before = stamps()
  params, step = checkpoint.load_params(directory, state.params, shardings.params)
  assert step == 2
  _assert_trees_equal(params, state.params)
  assert stamps() == before
  assert checkpoint.saved_config(directory) == {}


def test_load_params_without_checkpoint_names_the_fix(trained, tmp_path):
  state, shardings, _, _ = trained
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="teacher_checkpoint"):
    checkpoint.load_params(str(tmp_path / "empty"), state.params, shardings.params)


def test_truncate_jsonl_drops_rows_after_the_restored_step(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    for s in (10, 20, 30, 40):
      f.write(json.dumps({"step": s, "loss": 1.0 / s}) + "\n")
  metric_log.truncate_jsonl(path, 20)
  with open(path) as f:
    assert [json.loads(l)["step"] for l in f] == [10, 20]


def test_teacher_loads_in_bf16_from_an_f32_checkpoint_under_its_own_rules(trained, tmp_path):
  """config.frozen_teacher: params cast on read to bf16, placed by the teacher's own rules."""
  import dataclasses

  from kdjax import experiment

  state, _, _, mesh = trained
  ckpts = checkpoint.PhaseCheckpoints(str(tmp_path / "teacher"))
  ckpts.save(2, state, {}, {"seed": 3})
  ckpts.wait()
  ckpts.close()
  config = ml_collections.ConfigDict(dict(
      teacher=dataclasses.asdict(CFG), teacher_checkpoint=str(tmp_path / "teacher"),
      frozen_teacher=dict(dtype="bfloat16", param_dtype="bfloat16",
                          sharding_rules=[["embed", ["data", "fsdp"]], ["mlp", None]])))
  before = {p: hashlib.sha256(open(os.path.join(r, p), "rb").read()).hexdigest()
            for r, _, files in os.walk(tmp_path / "teacher") for p in files}
  teacher = experiment.load_teacher(config, str(tmp_path), mesh, sharding.DEFAULT_RULES)
  assert teacher.cfg.param_dtype == "bfloat16" and teacher.cfg.dtype == "bfloat16"
  assert teacher.rules == (("embed", ("data", "fsdp")), ("mlp", None))
  for got, want in zip(jax.tree.leaves(teacher.params), jax.tree.leaves(state.params)):
    assert got.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want).astype(jax.numpy.bfloat16))
  gate = teacher.shardings["layers"]["mlp"]["gate"]["kernel"]
  assert gate.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"), None)
  after = {p: hashlib.sha256(open(os.path.join(r, p), "rb").read()).hexdigest()
           for r, _, files in os.walk(tmp_path / "teacher") for p in files}
  assert after == before  # read-only
