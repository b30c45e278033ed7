"""The optimizer: weight decay by what a parameter is, and one step counter for every schedule."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kdjax import optim, sharding, train
from kdjax.model import ModelConfig
from kdjax.state import create_train_state
from support.params import unscan_params
from support.quick import first_quick

# Every kind of parameter the model has: biases on every projection, q/k norms, untied unembed.
CFG = ModelConfig(vocab_size=48, d_model=16, num_layers=3, num_heads=2, num_kv_heads=1,
                  mlp_dim=32, max_len=16, qkv_bias=True, out_bias=True, mlp_bias=True,
                  qk_norm=True, post_norms=True, tie_embeddings=False, scan_layers=True)


def _train_cfg(**kw):
  d = dict(steps=10, learning_rate=1e-2, warmup_steps=0, end_lr_fraction=1.0, weight_decay=0.1,
           grad_clip=1.0, b1=0.9, b2=0.95, grad_accum_steps=1)
  d.update(kw)
  return ml_collections.ConfigDict(d)


def _batch(seed, nan=False):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, size=(2, 9)).astype(np.int32)
  mask = np.ones((2, 8), np.float32)
  if nan:
    mask[0, 0] = np.nan  # corrupt data: the loss becomes NaN and the step is skipped
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask,
          "segment_ids": np.ones((2, 8), np.int32),
          "positions": np.tile(np.arange(8, dtype=np.int32), (2, 1))}


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


@pytest.mark.parametrize("scan_layers", first_quick([True, False]), ids=["scan", "loop"])
def test_norm_scales_and_biases_are_never_decayed(mesh, scan_layers):
  """With zero gradients the only update is weight decay: it must move every weight matrix and
  embedding table and no norm scale or bias, whatever their rank (stacked [layers, D] scales
  under scan, [H, K] QKV biases)."""
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
  tc = _train_cfg(weight_decay=0.5)
  tx = optim.make_optimizer(tc)
  state, _ = create_train_state(cfg, tx, 0, mesh, sharding.DEFAULT_RULES)
  # Away from their init (biases start at 0, which decay leaves at 0 either way).
  params = jax.jit(lambda p: jax.tree.map(lambda x: x + 0.5, p))(state.params)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(functools.partial(tx.update, step=jnp.int32(0)))(
      zero_grads, state.opt_state, params)
  kinds = set()
  for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    name = path[-1].key
    kinds.add((name, np.ndim(u)))
    moved = bool(np.any(np.asarray(u) != 0))
    assert moved == (name in ("kernel", "embedding")), jax.tree_util.keystr(path)
  # The model really has the parameters this is about: 2-D scales and biases when scanned.
  assert ("scale", 2 if scan_layers else 1) in kinds and ("bias", 3 if scan_layers else 2) in kinds


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_scanned_and_unrolled_models_train_to_the_same_params(mesh):
  """`scan_layers` only changes how the layers are run: a few AdamW steps with weight decay from
  the same init give the same params either way."""
  loop_cfg = dataclasses.replace(CFG, scan_layers=False)
  tc = _train_cfg()
  tx, schedule = optim.make_optimizer(tc), optim.make_schedule(tc)
  scan_state, _ = create_train_state(CFG, tx, 0, mesh, sharding.DEFAULT_RULES)
  loop_params = unscan_params(scan_state.params, CFG.num_layers)
  loop_state = scan_state.replace(params=loop_params, opt_state=tx.init(loop_params))
  for cfg, name in ((CFG, "scan"), (loop_cfg, "loop")):
    step = jax.jit(train.make_train_step(cfg, tx, schedule))
    state = scan_state if name == "scan" else loop_state
    for i in range(4):
      state, _ = step(state, None, _batch(i))
    if name == "scan":
      scanned = unscan_params(state.params, CFG.num_layers)
    else:
      unrolled = state.params
  # The forward passes differ only in float rounding (the same ops, scheduled differently);
  # decaying a norm scale would move it by lr * wd = 1e-3 per step.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               scanned, unrolled)


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_applied_learning_rate_is_the_logged_one_after_skipped_steps(mesh):
  """After two skipped (non-finite) steps, the update of step 2 uses schedule(2), the rate the
  step logs (and the one alpha and temperature schedules read the step at), not schedule(0)."""
  tc = _train_cfg(warmup_steps=4, weight_decay=0.0)
  tx, schedule = optim.make_optimizer(tc), optim.make_schedule(tc)
  state, _ = create_train_state(CFG, tx, 0, mesh, sharding.DEFAULT_RULES)
  step = jax.jit(train.make_train_step(CFG, tx, schedule))
  for i in range(2):
    state, metrics = step(state, None, _batch(i, nan=True))
    assert float(metrics["skipped_steps"]) == i + 1
  before = state.params
  state, metrics = step(state, None, _batch(2))
  logged = float(metrics["learning_rate"])
  assert int(state.skipped_steps) == 2 and float(schedule(2)) > 0
  assert logged == pytest.approx(float(schedule(2)))
  # Adam's first applied update is g / (|g| + eps) = +-1 wherever |g| >> eps, so each such
  # param moves by exactly the applied learning rate.
  deltas = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                           for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before))])
  np.testing.assert_allclose(np.max(deltas), logged, rtol=1e-3)
  np.testing.assert_allclose(np.median(deltas[deltas > 0]), logged, rtol=1e-3)
