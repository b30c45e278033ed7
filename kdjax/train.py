"""The pure, jitted training step: teacher forward as a constant, one objective, guarded update.

    teacher_out = stop_gradient(teacher_forward(t_params, batch))     # outside value_and_grad
    loss, grads = value_and_grad(objective.loss)(trainable, aux, batch, teacher_out, step)
    trainable, opt_state = optax update, kept only if loss and grads are finite

The objective (kdjax.objectives) is the distillation method; this module knows no loss variant.
The teacher's params are an ordinary, never-donated argument: they are never in the optimizer or
the student's state. On-policy distillation (kdjax.gkd) is a transform of the batch: with
probability lambda a step's batch is replaced by the student's own samples, scored by the same
objective in its on-policy form. Gradient accumulation and the guarded update are functions of
their own. Everything scheduled (learning rate, alpha, temperature, feature weight) reads the one
counter `state.step`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from kdjax import gkd, lora, objectives, sharding
from kdjax.model import ModelConfig, QuantConfig
from kdjax.objectives.base import Batch, Metrics
from kdjax.settings import DistillSettings, OnPolicy
from kdjax.state import TrainState

GradFn = Callable[..., tuple[Any, Metrics]]


def model_params(trainable: Any, frozen: Any) -> Any:
  """The student's params as its model reads them: a LoRA student's adapters (trainable) with
  its frozen base (kdjax.lora), or the trainable params themselves."""
  params = trainable[0] if isinstance(trainable, tuple) else trainable
  return params if frozen is None else lora.combine(frozen, params)


def make_grad_fn(objective: objectives.Objective, teacher_forward: Callable | None) -> GradFn:
  """`grad_fn(trainable, teacher_params, batch, step, frozen=None) -> (grads, metrics)` of one
  micro-batch; `frozen` is TrainState.frozen_params (a constant, like the teacher)."""
  def loss_of(trainable, batch, teacher_out, step, frozen):
    aux = trainable[1] if isinstance(trainable, tuple) else None
    return objective.loss(model_params(trainable, frozen), aux, batch, teacher_out, step)

  value_and_grad = jax.value_and_grad(loss_of, has_aux=True)

  def grad_fn(trainable, teacher_params, batch: Batch, step, frozen=None):
    # The teacher runs outside value_and_grad: only the student's loss is differentiated.
    teacher_out = teacher_forward(teacher_params, batch) if teacher_forward else None
    (_, metrics), grads = value_and_grad(trainable, batch, teacher_out, step, frozen)
    return grads, metrics

  return grad_fn


def delayed_quantization(float_grad_fn: GradFn, qat_grad_fn: GradFn, start_step: int) -> GradFn:
  """QAT from `start_step` on, the float student's gradient before it (a quantization delay:
  the weights settle before they learn the integer grid). One compiled step holds both; each
  step runs one (lax.cond)."""
  def grad_fn(trainable, teacher_params, batch: Batch, step, frozen=None):
    return jax.lax.cond(step < start_step, float_grad_fn, qat_grad_fn, trainable,
                        teacher_params, batch, step, frozen)

  return grad_fn


def with_student_samples(data_grad_fn: GradFn, sampled_grad_fn: GradFn, s_cfg: ModelConfig,
                         on_policy: OnPolicy, rules: sharding.Rules | None):
  """A micro-batch grad fn that, when the step's coin says so, first replaces the batch by the
  student's own samples (kdjax.gkd) and scores them with the on-policy objective."""
  def grad_fn(trainable, teacher_params, batch: Batch, step, is_on_policy, sample_key,
              frozen=None):
    def student_samples():
      samples = gkd.student_batch(s_cfg, model_params(trainable, frozen), batch, sample_key,
                                  on_policy, rules)
      grads, metrics = sampled_grad_fn(trainable, teacher_params, samples, step, frozen)
      return grads, dict(metrics, on_policy=jnp.ones((), jnp.float32))

    def data():
      grads, metrics = data_grad_fn(trainable, teacher_params, batch, step, frozen)
      return grads, dict(metrics, on_policy=jnp.zeros((), jnp.float32))

    return jax.lax.cond(is_on_policy, student_samples, data)

  return grad_fn


def accumulate(grad_fn, trainable, teacher_params, batch: Batch, step, is_on_policy, sample_key,
               steps: int, frozen=None):
  """(grads, metrics) of the whole batch from `steps` micro-batches scanned in sequence.

  Each micro-batch's gradient and metrics are weighted by its unmasked tokens and divided by the
  total at the end, so the result equals one pass over the whole batch (loss means are over real
  tokens, not rows; an on-policy micro-batch scores its own number of tokens).
  """
  if steps == 1:
    return grad_fn(trainable, teacher_params, batch, step, is_on_policy, sample_key, frozen)
  # Strided split (rows i, i + A, ...): with the batch sharded over devices, every device holds
  # a slice of every micro-batch, so no device idles while others work.
  micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // steps, steps, *x.shape[1:])
                       .swapaxes(0, 1), batch)

  def body(acc, mb_i):
    mb, i = mb_i
    grads, metrics = grad_fn(trainable, teacher_params, mb, step, is_on_policy,
                             jax.random.fold_in(sample_key, i), frozen)
    n = metrics["num_tokens"]
    sums = jax.tree.map(lambda a, x: a + n * x, acc[0], (grads, metrics))
    return (sums, acc[1] + n), None

  zeros = jax.eval_shape(grad_fn, trainable, teacher_params, jax.tree.map(lambda x: x[0], micro),
                         step, is_on_policy, sample_key, frozen)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
  ((grads, metrics), n_total), _ = jax.lax.scan(
      body, (zeros, jnp.zeros((), jnp.float32)), (micro, jnp.arange(steps)))
  grads, metrics = jax.tree.map(lambda x: x / jnp.maximum(n_total, 1.0), (grads, metrics))
  return grads, dict(metrics, num_tokens=n_total)


def guarded_update(tx: optax.GradientTransformationExtraArgs, state: TrainState, grads,
                   metrics: Metrics) -> tuple[TrainState, Metrics]:
  """The optax update at `state.step`, kept only if the loss and gradient are finite.

  A non-finite step keeps the old params and optimizer state (the batch counts as consumed and
  the step counter advances), so one bad batch cannot poison the run or a checkpoint.
  """
  trainable = state.trainable
  updates, opt_state = tx.update(grads, state.opt_state, trainable, step=state.step)
  new_trainable = optax.apply_updates(trainable, updates)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  keep_new = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_trainable, opt_state = keep_new((new_trainable, opt_state), (trainable, state.opt_state))
  params, aux_params = (new_trainable if state.aux_params is not None
                        else (new_trainable, None))
  skipped = state.skipped_steps + (~finite).astype(jnp.int32)
  streak = jnp.where(finite, 0, state.nonfinite_streak + 1).astype(jnp.int32)
  new_rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
  metrics = dict(metrics, grad_norm=grad_norm, skipped_steps=skipped.astype(jnp.float32),
                 nonfinite_streak=streak.astype(jnp.float32))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=new_rng,
                       skipped_steps=skipped, nonfinite_streak=streak,
                       aux_params=aux_params), metrics


def step_keys(rng_data: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(coin_key, sample_key): children of the sibling of the next state's key, so the on-policy
  coin (one per step: accumulation does not change lambda) and the samples are their own."""
  return tuple(jax.random.split(jax.random.split(jax.random.wrap_key_data(rng_data))[1]))


def make_train_step(s_cfg: ModelConfig, tx, schedule, *, t_cfg: ModelConfig | None = None,
                    distill: DistillSettings | None = None, grad_accum_steps: int = 1,
                    rules: sharding.Rules | None = None, t_rules: sharding.Rules | None = None,
                    loss_chunk_size: int = 0):
  """The pure step `train_step(state, teacher_params, batch) -> (state, metrics)`.

  Args:
    s_cfg, t_cfg: the student's and the teacher's models (t_cfg None: no teacher runs).
    tx, schedule: kdjax.optim's optimizer and its learning-rate schedule (logged).
    distill: the phase's distillation settings (kdjax.settings); they pick the objective.
    grad_accum_steps: micro-batches per step (`accumulate`).
    rules, t_rules: the student's and teacher's activation sharding rules (None: the compiler
      propagates shardings from the params alone).
    loss_chunk_size: the cross-entropy objective's chunk in tokens (the phase's
      TrainSettings.loss_chunk_size; a distillation loss chunks by `distill.loss_chunk_size`).
  Returns:
    train_step; its metrics hold the objective's, grad_norm, learning_rate, the NaN-guard
    counters, the scheduled settings by name, and 'on_policy' when on-policy is on.
  """
  build = functools.partial(_build, t_cfg=t_cfg, distill=distill, rules=rules, t_rules=t_rules,
                            ce_chunk_size=loss_chunk_size)
  objective, teacher_forward, on_policy = build(s_cfg)
  grad_fn = make_grad_fn(objective, teacher_forward)
  if s_cfg.quant.weight and s_cfg.quant.start_step > 0:
    float_cfg = dataclasses.replace(s_cfg, quant=QuantConfig())
    grad_fn = delayed_quantization(
        make_grad_fn(build(float_cfg)[0], teacher_forward),
        grad_fn, s_cfg.quant.start_step)
  if on_policy is None:
    micro_grad_fn = lambda tr, tp, batch, step, is_on_policy, key, frozen: grad_fn(
        tr, tp, batch, step, frozen)
  else:
    micro_grad_fn = with_student_samples(
        grad_fn, make_grad_fn(objective.with_on_policy(), teacher_forward), s_cfg, on_policy,
        rules)
  def train_step(state: TrainState, teacher_params, batch: Batch):
    if objective.needs_aux and state.aux_params is None:
      raise ValueError("train_step: feature distillation between widths needs the projection; "
                       "build the state with create_train_state(..., t_cfg=, distill=).")
    coin_key, sample_key = step_keys(state.rng)
    is_on_policy = (gkd.coin(coin_key, on_policy.fraction) if on_policy is not None
                    else jnp.zeros((), bool))
    grads, metrics = accumulate(micro_grad_fn, state.trainable, teacher_params, batch,
                                state.step, is_on_policy, sample_key, grad_accum_steps,
                                state.frozen_params)
    new_state, metrics = guarded_update(tx, state, grads, metrics)
    metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    if distill is not None:  # the scheduled settings this step used
      knobs = distill.at(state.step)
      metrics.update({name: jnp.asarray(knobs[name], jnp.float32) for name in distill.scheduled})
    return new_state, metrics

  return train_step


def _build(s_cfg, *, t_cfg, distill, rules, t_rules, ce_chunk_size):
  """(objective, teacher_forward or None, on-policy settings or None), checked."""
  objective = objectives.make(s_cfg, distill, t_cfg, rules, ce_chunk_size)
  on_policy = distill.on_policy if distill is not None else None
  if on_policy is not None:
    objective.with_on_policy()  # refuses objectives without a live teacher, before tracing
    if not on_policy.vocab_size:  # ids both models can score
      on_policy = dataclasses.replace(on_policy,
                                      vocab_size=min(s_cfg.vocab_size, t_cfg.vocab_size))
  teacher_forward = (objectives.make_teacher_forward(t_cfg, objective.teacher_needs, t_rules)
                     if t_cfg is not None else None)
  return objective, teacher_forward, on_policy


def jit_train_step(train_step, state_shardings, teacher_shardings, mesh):
  """Compiles with explicit shardings. The state is donated: its buffers are reused for the new
  state, halving peak memory for params + optimizer state. The teacher is never donated, and its
  in_shardings are the ones it was placed with, so it is never moved or copied per step.

  The returned function traces under `jax.set_mesh(mesh)`, where the model's logical activation
  constraints bind to mesh axes; metrics come back replicated, readable on every process.
  """
  jitted = jax.jit(
      train_step,
      in_shardings=(state_shardings, teacher_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnames=("state",))

  def step(state, teacher_params, batch):
    with jax.set_mesh(mesh):
      return jitted(state, teacher_params, batch)

  step.jitted = jitted  # for AOT lowering and cache inspection
  return step
