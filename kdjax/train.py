"""Train state, optimizer and the pure, jitted distillation step.

One compiled step does, for a batch:

    t_logits_BxLxV = stop_gradient(teacher(t_params, batch))          # a constant
    loss, grads = value_and_grad(student_loss)(s_params, t_logits_BxLxV, batch)
    s_params, opt_state = optax update                                 # student only

The teacher forward runs outside `value_and_grad`, so no gradient can reach it, and its params are
an ordinary (non-donated) argument: they are never in the optimizer or the student's state. With no
teacher the same step trains on next-token cross-entropy alone (teacher and scratch phases).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from kdjax import losses, sharding
from kdjax.model import ModelConfig, Transformer, unembedding

Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions: BxL int32; mask: BxL f32


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2] raw key data, advanced every step and checkpointed for sampling
  skipped_steps: jax.Array  # int32: steps whose update was skipped for a non-finite loss/grad
  nonfinite_streak: jax.Array  # int32: consecutive such steps up to now (0 after a good one)


@dataclasses.dataclass(frozen=True)
class DistillSettings:
  """The static part of the loss; a change here recompiles the step."""

  loss: str = "forward_kl"
  temperature: float = 1.0
  alpha: float = 0.5
  beta: float = 0.5
  skew: float = 0.1
  # > 0: the fused chunked loss from final hidden states; no [B, L, V] logits are held.
  loss_chunk_size: int = 0

  @classmethod
  def from_config(cls, d: Any) -> "DistillSettings":
    return cls(loss=d.loss, temperature=float(d.temperature), alpha=float(d.alpha),
               beta=float(d.get("beta", 0.5)), skew=float(d.get("skew", 0.1)),
               loss_chunk_size=int(d.get("loss_chunk_size", 0)))


def make_schedule(tc: Any) -> optax.Schedule:
  """Linear warmup to `learning_rate`, cosine decay to `end_lr_fraction` of it at `steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tc.learning_rate, warmup_steps=tc.warmup_steps,
      decay_steps=max(tc.steps, tc.warmup_steps + 1),
      end_value=tc.learning_rate * tc.end_lr_fraction)


def make_optimizer(tc: Any) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; norms and other vectors are not weight-decayed."""
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
  return optax.chain(
      optax.clip_by_global_norm(tc.grad_clip),
      optax.adamw(make_schedule(tc), b1=tc.b1, b2=tc.b2, eps=1e-8,
                  weight_decay=tc.weight_decay, mask=decay_mask))


def _dummy_tokens(model_cfg: ModelConfig) -> jax.Array:
  return jnp.zeros((1, min(8, model_cfg.max_len)), jnp.int32)


def init_params(model_cfg: ModelConfig, rng: jax.Array, mesh, rules) -> Any:
  """Params created already sharded: eval_shape -> logical specs -> jit(out_shardings)."""
  model = Transformer(model_cfg)
  init = lambda r: model.init(r, _dummy_tokens(model_cfg))["params"]
  shardings = sharding.logical_shardings(jax.eval_shape(init, rng), mesh, rules)
  return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)


def param_shardings(model_cfg: ModelConfig, mesh, rules) -> Any:
  model = Transformer(model_cfg)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), _dummy_tokens(model_cfg)))
  return sharding.logical_shardings(abstract["params"], mesh, rules)


def _abstract_boxed_state(model_cfg: ModelConfig, tx, seed: int):
  model = Transformer(model_cfg)

  def init(rng_data):
    params = model.init(jax.random.wrap_key_data(rng_data), _dummy_tokens(model_cfg))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1)),
                      skipped_steps=jnp.zeros((), jnp.int32),
                      nonfinite_streak=jnp.zeros((), jnp.int32))

  return init


def create_train_state(model_cfg: ModelConfig, tx, seed: int, mesh, rules):
  """Returns (state, state_shardings): a fresh, sharded TrainState built from `seed`."""
  init = _abstract_boxed_state(model_cfg, tx, seed)
  rng_data = jax.random.key_data(jax.random.key(seed))
  shardings = sharding.logical_shardings(jax.eval_shape(init, rng_data), mesh, rules)
  state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng_data)
  return state, shardings


def _forward(model: nn.Module, params, batch: Batch, final_hidden: bool = False) -> jax.Array:
  return model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                     batch["positions"], return_final_hidden=final_hidden)


def make_teacher_forward(t_cfg: ModelConfig, rules: sharding.Rules | None = None,
                         final_hidden: bool = False) -> Callable:
  """`teacher_forward(teacher_params, batch) -> t_logits_BxLxV`, a constant for the student.

  With `final_hidden` it returns (t_hidden_BxLxD, t_unembed_DxV) instead, for the chunked loss.
  `rules` bind the teacher's activation constraints; they may differ from the student's (say, a
  teacher sharded FSDP-only next to a tensor-parallel student).
  """
  t_model = Transformer(t_cfg)

  def teacher_forward(teacher_params, batch: Batch):
    with sharding.activation_rules(rules):
      if final_hidden:
        out = (_forward(t_model, teacher_params, batch, final_hidden=True),
               unembedding(t_cfg, teacher_params))
      else:
        out = _forward(t_model, teacher_params, batch)
    return jax.lax.stop_gradient(out)

  return teacher_forward


def make_student_loss(s_cfg: ModelConfig, distill: DistillSettings | None = None,
                      rules: sharding.Rules | None = None, t_softcap: float = 0.0) -> Callable:
  """`student_loss(params, batch, t_out) -> (loss, metrics)`.

  This is all the step differentiates: the teacher's output comes in as a plain argument:
  t_logits_BxLxV, (t_hidden_BxLxD, t_unembed_DxV) with the chunked loss, or None (no teacher).
  """
  s_model = Transformer(s_cfg)

  chunked = distill is not None and distill.loss_chunk_size > 0

  def student_loss(params, batch: Batch, t_out):
    if chunked and t_out is not None:
      t_hidden_BxLxD, t_unembed_DxV = t_out
      with sharding.activation_rules(rules):
        s_hidden_BxLxD = _forward(s_model, params, batch, final_hidden=True)
      s_unembed_DxV, t_unembed_DxV = losses.shared_vocab(unembedding(s_cfg, params),
                                                         t_unembed_DxV)
      return losses.chunked_distillation_loss(
          s_hidden_BxLxD, s_unembed_DxV, t_hidden_BxLxD, t_unembed_DxV,
          batch["targets"], batch["mask"], loss=distill.loss, temperature=distill.temperature,
          alpha=distill.alpha, beta=distill.beta, skew=distill.skew,
          chunk_size=distill.loss_chunk_size, s_logit_softcap=s_cfg.logit_softcap,
          t_logit_softcap=t_softcap)
    with sharding.activation_rules(rules):
      s_logits_BxLxV = _forward(s_model, params, batch)
    t_logits_BxLxV = t_out
    if t_logits_BxLxV is None:
      ce = losses.cross_entropy(s_logits_BxLxV, batch["targets"], batch["mask"])
      return ce, {"loss": ce, "hard_loss": ce, "num_tokens": jnp.sum(batch["mask"])}
    s_logits_BxLxV, t_logits_BxLxV = losses.shared_vocab(s_logits_BxLxV, t_logits_BxLxV)
    return losses.distillation_loss(
        s_logits_BxLxV, t_logits_BxLxV, batch["targets"], batch["mask"], loss=distill.loss,
        temperature=distill.temperature, alpha=distill.alpha, beta=distill.beta,
        skew=distill.skew)

  return student_loss


def make_train_step(s_cfg: ModelConfig, tx, schedule, *, t_cfg: ModelConfig | None = None,
                    distill: DistillSettings | None = None, grad_accum_steps: int = 1,
                    rules: sharding.Rules | None = None, t_rules: sharding.Rules | None = None):
  """The pure step `train_step(state, teacher_params, batch) -> (state, metrics)`.

  `rules` and `t_rules` bind the student's and the teacher's activation sharding constraints
  (None: unconstrained, the compiler propagates shardings from the params alone).

  With `grad_accum_steps = A > 1` the batch is split into A micro-batches scanned in sequence;
  each micro-batch's gradient is weighted by its share of unmasked tokens, so the update equals
  the one for the whole batch at once (loss means are over real tokens, not rows).
  """
  if t_cfg is not None and distill is None:
    raise ValueError("make_train_step: a teacher needs DistillSettings.")
  chunked = distill is not None and distill.loss_chunk_size > 0
  teacher_forward = (make_teacher_forward(t_cfg, t_rules, final_hidden=chunked)
                     if t_cfg is not None else None)
  grad_fn = jax.value_and_grad(
      make_student_loss(s_cfg, distill, rules, t_softcap=t_cfg.logit_softcap if t_cfg else 0.0),
      has_aux=True)

  def micro_step(params, teacher_params, batch: Batch):
    # The teacher runs outside value_and_grad: only the student's loss is differentiated.
    t_out = teacher_forward(teacher_params, batch) if teacher_forward else None
    (_, metrics), grads = grad_fn(params, batch, t_out)
    return grads, metrics

  def train_step(state: TrainState, teacher_params, batch: Batch):
    if grad_accum_steps == 1:
      grads, metrics = micro_step(state.params, teacher_params, batch)
    else:
      # Strided split (rows i, i + A, ...): with the batch sharded over devices, every device
      # holds a slice of every micro-batch, so no device idles while others work.
      micro = jax.tree.map(
          lambda x: x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps,
                              *x.shape[1:]).swapaxes(0, 1), batch)
      total_tokens = jnp.maximum(jnp.sum(batch["mask"]), 1.0)

      def body(acc, mb):
        grads, metrics = micro_step(state.params, teacher_params, mb)
        w = metrics["num_tokens"] / total_tokens
        acc = jax.tree.map(lambda a, x: a + w * x, acc, (grads, metrics))
        return acc, None

      zeros = jax.eval_shape(micro_step, state.params, teacher_params,
                             jax.tree.map(lambda x: x[0], micro))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
      (grads, metrics), _ = jax.lax.scan(body, zeros, micro)
      metrics["num_tokens"] = jnp.sum(batch["mask"])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    # NaN/Inf guard: a non-finite loss or gradient keeps the old params and optimizer state (the
    # batch counts as consumed), so one bad batch cannot poison the run or a checkpoint.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    keep_new = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep_new((params, opt_state), (state.params, state.opt_state))
    skipped = state.skipped_steps + (~finite).astype(jnp.int32)
    streak = jnp.where(finite, 0, state.nonfinite_streak + 1).astype(jnp.int32)
    metrics = dict(metrics, grad_norm=grad_norm,
                   learning_rate=jnp.asarray(schedule(state.step), jnp.float32),
                   skipped_steps=skipped.astype(jnp.float32),
                   nonfinite_streak=streak.astype(jnp.float32))
    new_rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=new_rng,
                         skipped_steps=skipped, nonfinite_streak=streak), metrics

  return train_step


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
