"""Loss schedules: values against hand formulas, and a scheduled step equals the unscheduled one."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kdjax import losses, optim, schedules, sharding, train
from kdjax.model import ModelConfig
from kdjax.settings import DistillSettings
from kdjax.state import create_train_state, init_params

T_CFG = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1,
                    mlp_dim=32, max_len=16)
S_CFG = dataclasses.replace(T_CFG, d_model=8, num_layers=1, num_heads=1, mlp_dim=16)
TC = ml_collections.ConfigDict(dict(steps=10, learning_rate=1e-2, warmup_steps=0,
                                    end_lr_fraction=1.0, weight_decay=0.1, grad_clip=1.0,
                                    b1=0.9, b2=0.95, grad_accum_steps=1))


def _hand(kind, start, end, steps, step):
  """The schedule from its definition, in float64."""
  t = min(step, steps) / steps
  if kind == "constant":
    return start
  if kind == "linear":
    return start + (end - start) * t
  return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("start, end", [(0.9, 0.1), (1.0, 4.0)])
def test_values_follow_the_hand_formulas(kind, start, end):
  sched = schedules.Schedule(kind=kind, end=end, steps=8)
  for step in (0, 1, 2, 4, 6, 7, 8, 9, 100):
    got = schedules.value(sched, start, jnp.asarray(step, jnp.int32))
    assert got.dtype == jnp.float32
    # The schedule runs in float32, the oracle in float64: a handful of float32 roundings, each
    # at most half an ulp of a value no larger than max(|start|, |end|).
    bound = 4 * np.finfo(np.float32).eps * max(abs(start), abs(end))
    np.testing.assert_allclose(float(got), _hand(kind, start, end, 8, step), rtol=0, atol=bound,
                               err_msg=f"{kind} at step {step}")


def test_a_few_values_by_hand():
  linear = schedules.Schedule(kind="linear", end=0.0, steps=4)
  cosine = schedules.Schedule(kind="cosine", end=0.0, steps=4)
  assert [float(schedules.value(linear, 1.0, s)) for s in range(6)] == [
      1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
  # 1/2 (1 + cos(pi s / 4)): 1, (2 + sqrt 2) / 4, 1/2, (2 - sqrt 2) / 4, 0.
  np.testing.assert_allclose([float(schedules.value(cosine, 1.0, s)) for s in range(5)],
                             [1.0, 0.8535534, 0.5, 0.1464466, 0.0], rtol=1e-6, atol=1e-7)


def test_endpoints_are_exact_and_constant_is_the_plain_value():
  for kind in ("linear", "cosine"):
    sched = schedules.Schedule(kind=kind, end=0.3, steps=5)
    assert float(schedules.value(sched, 0.7, 0)) == np.float32(0.7)
    for step in (5, 6, 50):  # from `steps` on: exactly `end`, not a rounding of it
      assert float(schedules.value(sched, 0.7, step)) == np.float32(0.3)
  # Constant hands back the very Python float, so an unscheduled step traces what it always did.
  start = 0.123
  assert schedules.value(schedules.Schedule(end=9.0, steps=3), start, 2) is start
  with pytest.raises(ValueError, match="unknown schedule kind"):
    schedules.value(schedules.Schedule(kind="step"), 1.0, 0)


def test_steps_zero_spans_the_phase_and_settings_come_from_the_config():
  d = ml_collections.ConfigDict(dict(
      loss="forward_kl", temperature=2.0, alpha=0.5,
      alpha_schedule=dict(kind="linear", end=1.0, steps=0),
      temperature_schedule=dict(kind="constant", end=1.0, steps=0)))
  settings = DistillSettings.from_config(d)
  assert settings.scheduled == ("alpha",)
  assert settings.feature_weight_schedule.is_constant  # absent from an older config
  with pytest.raises(ValueError, match="steps >= 1"):
    settings.at(0)
  resolved = settings.resolved(10)
  assert resolved.alpha_schedule.steps == 10
  knobs = resolved.at(jnp.asarray(5))
  assert float(knobs["alpha"]) == 0.75 and knobs["temperature"] == 2.0


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  toks = rng.integers(4, 32, size=(4, 9)).astype(np.int32)
  mask = np.ones((4, 8), np.float32)
  mask[3, 5:] = 0
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.ones((4, 8), np.int32),
          "positions": np.tile(np.arange(8, dtype=np.int32), (4, 1)), "mask": mask}


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_scheduled_step_equals_the_unscheduled_step_at_that_step():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  tx, lr = optim.make_optimizer(TC), optim.make_schedule(TC)
  t_params = init_params(T_CFG, jax.random.key(1), mesh, sharding.DEFAULT_RULES)
  state, _ = create_train_state(S_CFG, tx, 0, mesh, sharding.DEFAULT_RULES)
  state = state.replace(step=jnp.asarray(2, jnp.int32))
  # Half-way along both: alpha 0.25 and T = 2, values float32 holds exactly. (Not alpha = 0.5:
  # with equal static weights XLA may rewrite 0.5 a + 0.5 b as 0.5 (a + b), an ulp away.)
  scheduled = DistillSettings(
      temperature=3.0, alpha=0.0,
      alpha_schedule=schedules.Schedule(kind="linear", end=0.5, steps=4),
      temperature_schedule=schedules.Schedule(kind="cosine", end=1.0, steps=4))
  knobs = scheduled.at(state.step)
  alpha, temperature = float(knobs["alpha"]), float(knobs["temperature"])
  assert (alpha, temperature) == (0.25, 2.0)
  fixed = DistillSettings(temperature=temperature, alpha=alpha)
  batch = _batch()
  out = {}
  for name, distill in (("scheduled", scheduled), ("fixed", fixed)):
    step = jax.jit(train.make_train_step(S_CFG, tx, lr, t_cfg=T_CFG, distill=distill))
    out[name] = step(state, t_params, batch)
  (s_new, s_metrics), (f_new, f_metrics) = out["scheduled"], out["fixed"]
  jax.tree.map(np.testing.assert_array_equal, s_new.params, f_new.params)
  # The update is bitwise equal. A logged metric may not be: XLA is free to reassociate the
  # reduction that sums the loss terms differently when alpha and T are traced scalars than when
  # they are folded constants, which moves a float32 sum by an ulp on some CPUs (it does on the
  # Intel Xeon CI runs on). One ulp is the most such a rewrite of the same values can cost.
  for key in f_metrics:
    np.testing.assert_array_max_ulp(s_metrics[key], f_metrics[key], maxulp=1)
  assert float(s_metrics["alpha"]) == 0.25 and float(s_metrics["temperature"]) == 2.0
  assert "alpha" not in f_metrics  # only scheduled settings are logged


def test_chunked_loss_takes_a_traced_alpha_and_temperature():
  """The fused chunked loss with alpha/temperature as traced scalars (a schedule) equals it with
  the same values as static floats, in value and in gradient."""
  rng = np.random.default_rng(0)
  s_h, t_h = (jnp.asarray(rng.normal(size=(2, 6, 8)), jnp.float32) for _ in range(2))
  s_w, t_w = (jnp.asarray(rng.normal(size=(8, 16)), jnp.float32) for _ in range(2))
  labels = jnp.asarray(rng.integers(0, 16, size=(2, 6)), jnp.int32)
  mask = jnp.ones((2, 6), jnp.float32).at[1, 4:].set(0)

  @jax.jit
  def loss_and_grads(alpha, temperature):
    def f(h, w, a, t):
      return losses.chunked_distillation_loss(h, w, t_h, t_w, labels, mask, alpha=a,
                                              temperature=t, chunk_size=4)[0]
    static = jax.value_and_grad(lambda h, w: f(h, w, 0.25, 2.0), argnums=(0, 1))(s_h, s_w)
    traced = jax.value_and_grad(lambda h, w: f(h, w, alpha, temperature), argnums=(0, 1))(s_h, s_w)
    return static, traced

  # alpha 0.25, not 0.5: see test_scheduled_step_equals_the_unscheduled_step_at_that_step.
  (v0, g0), (v1, g1) = loss_and_grads(jnp.float32(0.25), jnp.float32(2.0))
  np.testing.assert_array_equal(v1, v0)
  jax.tree.map(np.testing.assert_array_equal, g1, g0)
