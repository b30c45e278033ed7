"""Every config in configs/ builds for its declared target hardware and fits its memory.

Each preset's `config.target` names the hardware (devices, processes, memory per device). The
whole training step of every phase is traced under jax.eval_shape on an abstract mesh of that many
devices, with the config's own rules, so shapes, shardings and the activation constraints are all
checked without allocating anything; then the per-device bytes of params + optimizer state (+ the
frozen teacher) are summed from the derived shardings.
"""

import glob
import importlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from kdjax import config_check, experiment, sharding, train
from kdjax.model import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith("_"))
CASES = [(name, preset) for name in CONFIGS
         for preset in importlib.import_module(f"configs.{name}").PRESETS]
# Params, optimizer state and teacher may take at most this share of a device: the rest is for
# activations, gradients and XLA's buffers.
STATE_SHARE = 0.5


def _abstract_state(model_cfg, tc, mesh, rules):
  tx = train.make_optimizer(tc)
  boxed = jax.eval_shape(train._abstract_boxed_state(model_cfg, tx, 0),
                         jax.ShapeDtypeStruct((2,), jnp.uint32))
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  return tx, nn.meta.unbox(boxed), shardings


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _phase_bytes(config, mesh, rules, phase):
  """Per-device bytes of one phase's state, after tracing its whole step for that mesh."""
  d = config.data
  teacher_cfg = ModelConfig.from_dict(config.teacher)
  model_cfg, tc = ((teacher_cfg, config.teacher_train) if phase == "teacher"
                   else (ModelConfig.from_dict(config.student), config.student_train))
  tx, state, state_sh = _abstract_state(model_cfg, tc, mesh, rules)
  total = sharding.per_device_bytes(state, state_sh)
  t_cfg = t_rules = t_params = None
  if phase == "distilled":
    t_cfg, t_rules = experiment.frozen_teacher_settings(config, rules)
    t_like = jax.eval_shape(lambda: train.Transformer(t_cfg).init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    t_sh = sharding.logical_shardings(t_like, mesh, t_rules)
    t_params = _with_shardings(nn.meta.unbox(t_like), t_sh)
    total += sharding.per_device_bytes(nn.meta.unbox(t_like), t_sh)
  step = train.make_train_step(
      model_cfg, tx, train.make_schedule(tc), t_cfg=t_cfg,
      distill=train.DistillSettings.from_config(config.distill) if t_cfg else None,
      grad_accum_steps=tc.grad_accum_steps, rules=rules, t_rules=t_rules)
  batch = {k: jax.ShapeDtypeStruct((d.batch_size, d.seq_len),
                                   jnp.float32 if k == "mask" else jnp.int32,
                                   sharding=sharding.batch_sharding(mesh))
           for k in ("inputs", "targets", "segment_ids", "positions", "mask")}
  with jax.sharding.use_abstract_mesh(mesh):
    new_state, metrics = jax.eval_shape(step, _with_shardings(state, state_sh), t_params, batch)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32
  return total


@pytest.mark.parametrize("name, preset", CASES)
def test_config_builds_and_fits_its_target(name, preset):
  config = importlib.import_module(f"configs.{name}").get_config(preset)
  target = config.target
  config_check.check_config(config, target.devices, target.processes)
  mesh = sharding.abstract_mesh(config.mesh, target.devices)
  rules = sharding.rules_from_config(config)
  budget = STATE_SHARE * target.memory_gib * 2**30
  for phase in ("teacher", "distilled"):  # scratch trains the same student alone
    used = _phase_bytes(config, mesh, rules, phase)
    assert used <= budget, (f"{name}:{preset} {phase} needs {used / 2**30:.2f} GiB of state per "
                            f"device on {target.name}; the budget is {budget / 2**30:.2f} GiB")


def test_lm1b_is_sharded_not_replicated():
  # The 1.0B teacher's training state (12 bytes/param in f32 + Adam) would take 11.3 GiB on one
  # device; FSDP over 8 devices must bring each share to 1/8 of it (norm scales aside).
  config = importlib.import_module("configs.lm1b").get_config()
  mesh = sharding.abstract_mesh(config.mesh, config.target.devices)
  t_cfg = ModelConfig.from_dict(config.teacher)
  _, state, state_sh = _abstract_state(t_cfg, config.teacher_train, mesh,
                                       sharding.rules_from_config(config))
  full = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  per_device = sharding.per_device_bytes(state, state_sh)
  assert t_cfg.num_params() > 1e9 and full > 11 * 2**30
  assert per_device <= full / 8 * 1.001
  # The frozen teacher in bf16, over data x fsdp: 2 bytes/param / 8 devices.
  t_cfg, t_rules = experiment.frozen_teacher_settings(config, sharding.rules_from_config(config))
  like = jax.eval_shape(lambda: train.Transformer(t_cfg).init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  frozen = sharding.per_device_bytes(nn.meta.unbox(like), sharding.logical_shardings(like, mesh,
                                                                                     t_rules))
  assert frozen <= 2 * t_cfg.num_params() / 8 * 1.001
