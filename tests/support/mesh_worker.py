"""Runs one distillation step on several meshes of 8 CPU devices; tests/test_sharding.py reads it.

Launched as a subprocess because the CPU device count is fixed when JAX's backend starts (kdjax
installed, or PYTHONPATH=. from the repo root):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/support/mesh_worker.py OUT.npz

For each mesh it writes the first step's metrics, the updated student params and the sharding of
every param (spec and per-device shard shape). The reference is one device of the same process.
"""

import dataclasses
import json
import sys

import kdjax  # noqa: F401  (XLA flags before the backend starts)
import jax
import numpy as np
import optax

from kdjax import sharding, train
from kdjax.model import ModelConfig
from kdjax.settings import DistillSettings
from kdjax.state import create_train_state, init_params, param_shardings

jax.config.update("jax_numpy_rank_promotion", "raise")

# Heads divisible by 8 so a tensor axis of 8 splits them; 2 KV heads do not divide 8 and must
# fall back to replication. Vocab and mlp widths divide every mesh axis.
T_CFG = ModelConfig(vocab_size=128, d_model=64, num_layers=2, num_heads=8, num_kv_heads=8,
                    mlp_dim=128, max_len=32)
S_CFG = dataclasses.replace(T_CFG, d_model=32, num_layers=2, num_heads=8, num_kv_heads=2,
                            head_dim=8, mlp_dim=64)
DISTILL = DistillSettings(loss="forward_kl", temperature=2.0, alpha=0.5)
MESHES = {"1x1x1": (1, 1, 1), "8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "2x2x2": (2, 2, 2),
          "1x1x8": (1, 1, 8)}
# The frozen teacher sharded its own way: every param dim named 'embed' split over all 8 devices.
TEACHER_FSDP_RULES = (("embed", ("data", "fsdp", "tensor")),) + tuple(
    r for r in sharding.DEFAULT_RULES if r[0] != "embed")


def batch(b=8, l=16):
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, T_CFG.vocab_size, size=(b, l + 1)).astype(np.int32)
  segment_ids = np.ones((b, l), np.int32)
  segment_ids[1, 9:] = 2
  segment_ids[3, 12:] = 0
  positions = np.where(segment_ids == 2, np.arange(l) - 9, np.arange(l)).astype(np.int32)
  positions[segment_ids == 0] = 0
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
          "positions": positions, "mask": (segment_ids != 0).astype(np.float32)}


def run(mesh, teacher_rules, teacher_cfg, distill=DISTILL):
  rules = sharding.DEFAULT_RULES
  # SGD: the update is proportional to the gradient, so comparing updated params compares
  # gradients (Adam's first step is ~lr * sign(g), which would hide them).
  tx = optax.sgd(0.1)
  state, state_sh = create_train_state(S_CFG, tx, 0, mesh, rules)
  t_params = init_params(teacher_cfg, jax.random.key(7), mesh, teacher_rules)
  t_sh = param_shardings(teacher_cfg, mesh, teacher_rules)
  step = train.make_train_step(S_CFG, tx, lambda s: 0.1, t_cfg=teacher_cfg, distill=distill,
                               rules=rules, t_rules=teacher_rules)
  step_fn = train.jit_train_step(step, state_sh, t_sh, mesh)
  device_batch = {k: sharding.global_array(v, sharding.batch_sharding(mesh))
                  for k, v in batch().items()}
  with jax.set_mesh(mesh):
    hlo = step_fn.jitted.lower(state, t_params, device_batch).as_text()
  new_state, metrics = step_fn(state, t_params, device_batch)
  out = {f"metric/{k}": np.asarray(v) for k, v in metrics.items()}
  layout = {}
  # The optimizer state's layout, with Adam's moments (SGD above keeps none).
  adam_state, _ = create_train_state(S_CFG, optax.adam(1e-3), 0, mesh, rules)
  for tag, tree in (("param", new_state.params), ("teacher", t_params),
                    ("mu", adam_state.opt_state)):
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
      if not hasattr(x, "sharding") or x.ndim == 0:
        continue
      name = f"{tag}/{jax.tree_util.keystr(path)}"
      if tag == "param":
        out[name] = np.asarray(x)
      layout[name] = {"spec": [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec],
                      "shard_shape": list(x.sharding.shard_shape(x.shape)),
                      "shape": list(x.shape), "dtype": str(x.dtype)}
  # Activation constraints bind only under a mesh context and logical rules: count them.
  layout["_constraints"] = hlo.count("sharding_constraint")
  return out, layout


def main(path):
  assert jax.device_count() == 8, jax.device_count()
  arrays, layouts = {}, {}
  for name, shape in MESHES.items():
    devices = jax.devices()[:int(np.prod(shape))]
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), devices)
    out, layout = run(mesh, sharding.DEFAULT_RULES, T_CFG)
    arrays.update({f"{name}/{k}": v for k, v in out.items()})
    layouts[name] = layout
  # The fused chunked loss on a sharded batch: 2 chunks of 8 positions x 8 rows.
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  out, layout = run(mesh, sharding.DEFAULT_RULES, T_CFG,
                    dataclasses.replace(DISTILL, loss_chunk_size=64))
  arrays.update({f"2x2x2_chunked/{k}": v for k, v in out.items()})
  layouts["2x2x2_chunked"] = layout
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  bf16_teacher = dataclasses.replace(T_CFG, param_dtype="bfloat16", dtype="bfloat16")
  for name, cfg in (("teacher_fsdp_f32", T_CFG), ("teacher_fsdp_bf16", bf16_teacher)):
    out, layout = run(mesh, TEACHER_FSDP_RULES, cfg)
    arrays.update({f"{name}/{k}": v for k, v in out.items()})
    layouts[name] = layout
  np.savez(path, **arrays)
  with open(path + ".json", "w") as f:
    json.dump(layouts, f)


if __name__ == "__main__":
  main(sys.argv[1])
