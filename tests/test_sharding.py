"""Sharded steps equal the one-device step; params, optimizer state and teacher are sharded as
the rules say; rules, meshes and per-device sizes are derived, not written per parameter.

The 8-device checks run tests/support/mesh_worker.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the device count is fixed when JAX starts).
"""

import json
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from kdjax import optim, sharding, train
from kdjax.model import ModelConfig
from kdjax.state import create_train_state, init_params, param_shardings

from support import scripts_loader
from support.background import Background

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ("8x1x1", "2x4x1", "2x2x2", "1x1x8", "2x2x2_chunked")  # the last: fused chunked loss
K = "param/['layers']"


def _mesh_worker(directory):
  env = scripts_loader.subprocess_env(JAX_PLATFORMS="cpu",
                                      XLA_FLAGS="--xla_force_host_platform_device_count=8")
  return [sys.executable, os.path.join(ROOT, "tests", "support", "mesh_worker.py"),
          os.path.join(directory, "out.npz")], env


# mesh_worker.py takes about a minute of one core: it runs in the background (support/background).
WORKER = Background("kdjax_mesh_", _mesh_worker)


@pytest.fixture(scope="module")
def worker():
  try:
    out = os.path.join(WORKER.wait(), "out.npz")
    with open(out + ".json") as f:
      layouts = json.load(f)
    yield dict(np.load(out)), layouts
  finally:
    WORKER.stop()


def _results(arrays, name):
  prefix = name + "/"
  return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def _assert_normwise_close(got, want, rtol, what):
  # Normwise: a reordered f32 reduction moves each element by a few ulps of the largest ones;
  # an element that cancels to ~0 has no elementwise relative bound.
  err = np.max(np.abs(got - want))
  assert err <= rtol * np.max(np.abs(want)), (what, err, np.max(np.abs(want)))


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
@pytest.mark.parametrize("mesh", MESHES)
def test_first_step_matches_one_device(worker, mesh):
  arrays, _ = worker
  ref, got = _results(arrays, "1x1x1"), _results(arrays, mesh)
  assert set(ref) == set(got)
  for key in ("loss", "soft_loss", "hard_loss", "grad_norm", "num_tokens"):
    np.testing.assert_allclose(got[f"metric/{key}"], ref[f"metric/{key}"], rtol=1e-5,
                               err_msg=f"{mesh} {key}")
  params = [k for k in ref if k.startswith("param/")]
  assert len(params) == 11
  for key in params:
    assert got[key].shape == ref[key].shape
    _assert_normwise_close(got[key], ref[key], 1e-5, f"{mesh} {key}")


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_params_and_optimizer_state_are_sharded_as_the_rules_say(worker):
  _, layouts = worker
  gate = layouts["2x2x2"][f"{K}['mlp']['gate']['kernel']"]  # layers x embed x mlp
  assert gate["spec"] == [None, "fsdp", "tensor"]
  assert gate["shape"] == [2, 32, 64] and gate["shard_shape"] == [2, 16, 32]
  embedding = layouts["2x2x2"]["param/['embed']['embedding']"]  # vocab x embed
  assert embedding["spec"] == ["tensor", "fsdp"] and embedding["shard_shape"] == [64, 16]
  query = layouts["1x1x8"][f"{K}['attn']['query']['kernel']"]  # 8 heads over tensor=8
  assert query["shard_shape"] == [2, 32, 1, 8]
  # 2 KV heads do not divide tensor=8: that dim is replicated instead of failing.
  key = layouts["1x1x8"][f"{K}['attn']['key']['kernel']"]
  assert key["spec"][2] is None and key["shard_shape"] == key["shape"]
  fsdp = layouts["2x4x1"][f"{K}['mlp']['down']['kernel']"]  # layers x mlp x embed
  assert fsdp["spec"] == [None, "tensor", "fsdp"] and fsdp["shard_shape"] == [2, 64, 8]
  # Adam's moments are laid out like the params they track.
  mu = [v for k, v in layouts["2x2x2"].items() if k.startswith("mu/")
        and k.endswith("['mlp']['gate']['kernel']")]
  assert len(mu) == 2 and all(m["spec"] == gate["spec"] for m in mu)  # mu and nu
  # Data parallelism alone replicates the params.
  assert layouts["8x1x1"][f"{K}['mlp']['gate']['kernel']"]["shard_shape"] == [2, 32, 64]


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_activation_constraints_bind_in_every_mesh(worker):
  _, layouts = worker
  for mesh in MESHES:
    assert layouts[mesh]["_constraints"] > 0, mesh


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_teacher_sharded_and_stored_by_its_own_rules(worker):
  arrays, layouts = worker
  f32, bf16 = layouts["teacher_fsdp_f32"], layouts["teacher_fsdp_bf16"]
  for layout in (f32, bf16):
    # 'embed' over data x fsdp x tensor: each device holds 1/8 of the teacher's model width,
    # while the student next to it keeps the default rules.
    gate = layout["teacher/['layers']['mlp']['gate']['kernel']"]
    assert gate["spec"][1] == ["data", "fsdp", "tensor"] and gate["shard_shape"] == [2, 8, 128]
    assert layout[f"{K}['mlp']['gate']['kernel']"]["spec"] == [None, "fsdp", "tensor"]
  assert all(v["dtype"] == "bfloat16" for k, v in bf16.items() if k.startswith("teacher/"))
  assert all(v["dtype"] == "float32" for k, v in bf16.items() if k.startswith("param/"))
  ref = _results(arrays, "1x1x1")
  # The same f32 teacher sharded differently gives the same step.
  np.testing.assert_allclose(arrays["teacher_fsdp_f32/metric/loss"], ref["metric/loss"], rtol=1e-5)
  # A bf16 teacher shifts the soft targets by bf16 rounding (8 mantissa bits), not more.
  np.testing.assert_allclose(arrays["teacher_fsdp_bf16/metric/loss"], ref["metric/loss"],
                             rtol=1e-2)
  assert arrays["teacher_fsdp_bf16/metric/loss"] != ref["metric/loss"]


# In-process (one device) checks of the derivation itself.

CFG = ModelConfig(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64, max_len=16)


def test_shardings_come_from_the_rules_and_fit_any_mesh():
  mesh = sharding.abstract_mesh({"data": 2, "fsdp": 4, "tensor": 2}, 16)
  specs = jax.tree.map(lambda s: s.spec, param_shardings(CFG, mesh, sharding.DEFAULT_RULES))
  assert specs["embed"]["embedding"] == P("tensor", "fsdp")
  assert specs["layers"]["attn"]["query"]["kernel"] == P(None, "fsdp", "tensor", None)
  assert specs["layers"]["attn"]["key"]["kernel"] == P(None, "fsdp", "tensor", None)
  # Rules from a config (lists, as ml_collections stores them) give the same layout.
  as_config = [[name, list(ax) if isinstance(ax, tuple) else ax]
               for name, ax in sharding.DEFAULT_RULES]
  assert sharding.parse_rules(as_config) == sharding.DEFAULT_RULES
  assert sharding.parse_rules([]) is None
  # 3 KV heads cannot split over tensor=2: that dim replicates, the others stay sharded.
  odd = ModelConfig(**{**CFG.__dict__, "num_heads": 6, "num_kv_heads": 3, "head_dim": 8})
  key = jax.tree.map(lambda s: s.spec,
                     param_shardings(odd, mesh, sharding.DEFAULT_RULES))
  assert key["layers"]["attn"]["key"]["kernel"] == P(None, "fsdp", None, None)


def test_a_replicated_dimension_is_said_once_on_stderr(capfd):
  """A user whose 5 KV heads cannot split over tensor=2 is told on stderr, once per process,
  however many params (key and value kernels) and derivations meet it."""
  mesh = sharding.abstract_mesh({"data": 2, "fsdp": 4, "tensor": 2}, 16)
  odd = ModelConfig(**{**CFG.__dict__, "num_heads": 10, "num_kv_heads": 5, "head_dim": 8})
  capfd.readouterr()
  for _ in range(2):
    param_shardings(odd, mesh, sharding.DEFAULT_RULES)
  err = capfd.readouterr().err
  assert err.count("dimension of size 5 is not divisible by mesh axes tensor") == 1, err
  assert len(err.strip().splitlines()) == 1


def test_per_device_bytes_divides_by_the_mesh():
  mesh = sharding.abstract_mesh({"data": 1, "fsdp": 4, "tensor": 2}, 8)
  like = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0),
                                                  sharding.make_mesh({"data": 1, "fsdp": 1,
                                                                      "tensor": 1}),
                                                  sharding.DEFAULT_RULES))
  total = sum(x.size * 4 for x in jax.tree.leaves(like))
  per_device = sharding.per_device_bytes(like, param_shardings(CFG, mesh,
                                                                     sharding.DEFAULT_RULES))
  # Norm scales are split only over fsdp (4), every matrix over fsdp x tensor (8).
  norms = 4 * CFG.d_model * (2 * CFG.num_layers + 1)
  assert per_device == (total - norms) // 8 + norms // 4


def test_mesh_shape_fills_minus_one_and_rejects_bad_sizes():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  assert sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  for bad in ({"data": -1, "fsdp": -1, "tensor": 1}, {"data": 3, "fsdp": 1, "tensor": 1},
              {"data": 0, "fsdp": 1, "tensor": 1}, {"data": -1, "fsdp": 3, "tensor": 1}):
    with pytest.raises(ValueError, match="config.mesh"):
      sharding.mesh_shape(bad, 8)


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_activation_constraints_only_under_rules():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  tx = optim.make_optimizer(ml_collections.ConfigDict(dict(
      steps=10, learning_rate=1e-3, warmup_steps=0, end_lr_fraction=1.0, weight_decay=0.0,
      grad_clip=1.0, b1=0.9, b2=0.95)))
  state, state_sh = create_train_state(CFG, tx, 0, mesh, sharding.DEFAULT_RULES)
  batch = {k: np.ones((2, 8), np.int32) for k in ("inputs", "targets", "segment_ids",
                                                   "positions")}
  batch["mask"] = np.ones((2, 8), np.float32)
  counts = {}
  for rules in (None, sharding.DEFAULT_RULES):
    step = train.jit_train_step(train.make_train_step(CFG, tx, lambda s: 0.0, rules=rules),
                                state_sh, None, mesh)
    with jax.set_mesh(mesh):
      counts[rules is None] = step.jitted.lower(state, None, batch).as_text().count(
          "sharding_constraint")
  assert counts[True] == 0 and counts[False] >= 3 * CFG.num_layers
