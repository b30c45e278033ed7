"""Train state, optimizer and the pure, jitted distillation step.

One compiled step does, for a batch:

    t_logits_BxLxV = stop_gradient(teacher(t_params, batch))          # a constant
    loss, grads = value_and_grad(student_loss)(s_params, t_logits_BxLxV, batch)
    s_params, opt_state = optax update                                 # student only

The teacher forward runs outside `value_and_grad`, so no gradient can reach it, and its params are
an ordinary (non-donated) argument: they are never in the optimizer or the student's state. With no
teacher the same step trains on next-token cross-entropy alone (teacher and scratch phases).

Feature distillation (kdjax.features) adds hidden-state and attention-map terms; a learned
projection, when the widths differ, is trained next to the params as `TrainState.aux_params`.
A scheduled alpha, temperature or feature weight (kdjax.schedules) is computed inside the step from
`state.step`; unscheduled, they stay static Python floats and the step is what it always was.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from kdjax import cache_losses, features, gkd, losses, schedules, sharding
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
  # Trained state that is not the model: {'projection': ...} of feature distillation when widths
  # differ (kdjax.features), else None. Optimized with the params; never exported or evaluated.
  aux_params: Any = None


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
  # Feature distillation (kdjax.features); 0 weights leave it out of the step entirely.
  feature_weight: float = 0.0
  feature_loss: str = "mse"  # 'mse' or 'cosine'
  feature_layers: tuple[tuple[int, int], ...] = ()  # (student, teacher) pairs; () = uniform
  attention_weight: float = 0.0
  # Each starts from the plain field above (kdjax.schedules); constant = unscheduled.
  alpha_schedule: schedules.Schedule = schedules.Schedule()
  temperature_schedule: schedules.Schedule = schedules.Schedule()
  feature_weight_schedule: schedules.Schedule = schedules.Schedule()
  # Offline teacher (kdjax.teacher_cache): non-empty = the soft loss reads the batch's cached
  # t_* arrays with this estimator (cache_losses) and the step runs no teacher; cache_vocab_size
  # is the cache's vocabulary, which the student's logits are cut to (padding rows past it).
  cache_estimator: str = ""
  cache_vocab_size: int = 0
  # On-policy distillation (kdjax.gkd); None = off.
  on_policy: gkd.OnPolicy | None = None

  @classmethod
  def from_config(cls, d: Any) -> "DistillSettings":
    schedule = lambda name: schedules.Schedule.from_config(d.get(name, None))
    return cls(loss=d.loss, temperature=float(d.temperature), alpha=float(d.alpha),
               beta=float(d.get("beta", 0.5)), skew=float(d.get("skew", 0.1)),
               loss_chunk_size=int(d.get("loss_chunk_size", 0)),
               feature_weight=float(d.get("feature_weight", 0.0)),
               feature_loss=str(d.get("feature_loss", "mse")),
               feature_layers=tuple((int(i), int(j)) for i, j in d.get("feature_layers", ())),
               attention_weight=float(d.get("attention_weight", 0.0)),
               alpha_schedule=schedule("alpha_schedule"),
               temperature_schedule=schedule("temperature_schedule"),
               feature_weight_schedule=schedule("feature_weight_schedule"),
               cache_estimator=(str(d.get("cache_estimator", "topk_residual"))
                                if d.get("teacher_cache", "") else ""),
               on_policy=gkd.OnPolicy(
                   fraction=float(d.on_policy_fraction),
                   prompt_tokens=int(d.get("on_policy_prompt_tokens", 32)),
                   new_tokens=int(d.get("on_policy_new_tokens", 0)),
                   temperature=float(d.get("on_policy_temperature", 1.0)))
               if d.get("on_policy_fraction", 0.0) > 0 else None)

  def _schedules(self) -> dict[str, tuple[schedules.Schedule, float]]:
    return {"alpha": (self.alpha_schedule, self.alpha),
            "temperature": (self.temperature_schedule, self.temperature),
            "feature_weight": (self.feature_weight_schedule, self.feature_weight)}

  def at(self, step) -> dict[str, float | jax.Array]:
    """alpha, temperature and feature_weight for the update after `step` updates: the plain
    Python floats where unscheduled, traced float32 scalars where scheduled."""
    return {name: schedules.value(s, start, step) for name, (s, start) in self._schedules().items()}

  @property
  def uses_teacher(self) -> bool:
    """Whether any term of the loss reads a teacher (live or cached): False for alpha == 0 held
    constant with no feature term and no on-policy batches, which is cross-entropy alone."""
    soft = self.alpha > 0 or not self.alpha_schedule.is_constant
    return soft or any(features.terms_on(self)) or self.on_policy is not None

  @property
  def scheduled(self) -> tuple[str, ...]:
    """Names of the settings that follow a non-constant schedule (logged every step)."""
    return tuple(name for name, (s, _) in self._schedules().items() if not s.is_constant)

  def resolved(self, total_steps: int) -> "DistillSettings":
    """Schedules with `steps=0` stretched over the phase's `total_steps`."""
    return dataclasses.replace(
        self, alpha_schedule=self.alpha_schedule.resolved(total_steps),
        temperature_schedule=self.temperature_schedule.resolved(total_steps),
        feature_weight_schedule=self.feature_weight_schedule.resolved(total_steps))


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


def _abstract_boxed_state(model_cfg: ModelConfig, tx, seed: int,
                          plan: features.FeaturePlan | None = None):
  model = Transformer(model_cfg)

  def init(rng_data):
    params = model.init(jax.random.wrap_key_data(rng_data), _dummy_tokens(model_cfg))["params"]
    aux_params = None
    if plan is not None and plan.projection:
      # Its own stream of the seed: the student's params are the same with or without it.
      aux_params = {"projection": features.init_projection(
          plan, jax.random.fold_in(jax.random.key(seed), 2))}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(_trainable(params, aux_params)),
                      rng=jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1)),
                      skipped_steps=jnp.zeros((), jnp.int32),
                      nonfinite_streak=jnp.zeros((), jnp.int32), aux_params=aux_params)

  return init


def _trainable(params, aux_params):
  """What the optimizer updates: the params alone (so an optimizer state without feature
  distillation is what it always was), or (params, aux_params)."""
  return params if aux_params is None else (params, aux_params)


def create_train_state(model_cfg: ModelConfig, tx, seed: int, mesh, rules, *,
                       t_cfg: ModelConfig | None = None, distill: DistillSettings | None = None):
  """Returns (state, state_shardings): a fresh, sharded TrainState built from `seed`.

  With `t_cfg` and `distill` asking for hidden-state distillation between different widths, the
  state also holds the learned projection (`aux_params`) and its optimizer state.
  """
  init = _abstract_boxed_state(model_cfg, tx, seed, features.make_plan(distill, model_cfg, t_cfg))
  rng_data = jax.random.key_data(jax.random.key(seed))
  shardings = sharding.logical_shardings(jax.eval_shape(init, rng_data), mesh, rules)
  state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng_data)
  return state, shardings


def abstract_train_state(model_cfg: ModelConfig, tx, seed: int, mesh, rules, *,
                         t_cfg: ModelConfig | None = None, distill: DistillSettings | None = None):
  """(abstract state, state_shardings) of `create_train_state`, with nothing allocated or
  compiled: enough to restore a checkpoint into (checkpoint.PhaseCheckpoints.restore)."""
  init = _abstract_boxed_state(model_cfg, tx, seed, features.make_plan(distill, model_cfg, t_cfg))
  boxed = jax.eval_shape(init, jax.random.key_data(jax.random.key(seed)))
  return nn.meta.unbox(boxed), sharding.logical_shardings(boxed, mesh, rules)


def _forward(model: nn.Module, params, batch: Batch, final_hidden: bool = False) -> jax.Array:
  return model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                     batch["positions"], return_final_hidden=final_hidden)


def make_teacher_forward(t_cfg: ModelConfig, rules: sharding.Rules | None = None,
                         final_hidden: bool = False,
                         plan: features.FeaturePlan | None = None) -> Callable:
  """`teacher_forward(teacher_params, batch) -> t_logits_BxLxV`, a constant for the student.

  With `final_hidden` it returns (t_hidden_BxLxD, t_unembed_DxV) instead, for the chunked loss.
  With a feature `plan` it returns (that output, t_feats), t_feats the mapped layers' hidden
  states and attention maps (features.forward).
  `rules` bind the teacher's activation constraints; they may differ from the student's (say, a
  teacher sharded FSDP-only next to a tensor-parallel student).
  """
  t_model = Transformer(t_cfg)

  def teacher_forward(teacher_params, batch: Batch):
    with sharding.activation_rules(rules):
      if plan is not None:
        out, t_feats = features.forward(t_model, t_cfg, teacher_params, batch, plan,
                                        plan.t_layers, final_hidden)
        if final_hidden:
          out = (out, unembedding(t_cfg, teacher_params))
        out = (out, t_feats)
      elif final_hidden:
        out = (_forward(t_model, teacher_params, batch, final_hidden=True),
               unembedding(t_cfg, teacher_params))
      else:
        out = _forward(t_model, teacher_params, batch)
    return jax.lax.stop_gradient(out)

  return teacher_forward


def make_student_loss(s_cfg: ModelConfig, distill: DistillSettings | None = None,
                      rules: sharding.Rules | None = None, t_softcap: float = 0.0, *,
                      t_cfg: ModelConfig | None = None) -> Callable:
  """`student_loss(params, batch, t_out, aux_params=None, step=0, on_policy=False)
  -> (loss, metrics)`.

  This is all the step differentiates: the teacher's output comes in as a plain argument:
  t_logits_BxLxV, (t_hidden_BxLxD, t_unembed_DxV) with the chunked loss, or None (no teacher);
  with feature distillation (which needs `t_cfg`) it is (that, t_feats), see make_teacher_forward.
  With a teacher cache (`distill.cache_estimator`) t_out is None and the batch carries the
  cached teacher (cache_losses). `aux_params` holds the feature projection when widths differ;
  `step` (state.step, traced) drives the schedules of alpha, temperature and feature weight.
  `on_policy` (static): the batch is the student's own samples (kdjax.gkd), and the soft loss is
  the generalized JSD (distill.beta), with no cross-entropy (feature terms, if on, still apply).
  """
  s_model = Transformer(s_cfg)

  cached = distill is not None and bool(distill.cache_estimator)
  chunked = distill is not None and distill.loss_chunk_size > 0
  plan = features.make_plan(distill, s_cfg, t_cfg)
  if t_cfg is None and any(features.terms_on(distill)):
    raise ValueError("make_student_loss: feature distillation needs the teacher's t_cfg.")

  def forward(params, batch):
    with sharding.activation_rules(rules):
      if plan is None:
        return _forward(s_model, params, batch, final_hidden=chunked), None
      return features.forward(s_model, s_cfg, params, batch, plan, plan.s_layers, chunked)

  def student_loss(params, batch: Batch, t_out, aux_params=None, step=0, on_policy=False):
    if t_out is None and not cached:  # no teacher: next-token cross-entropy alone
      with sharding.activation_rules(rules):
        s_logits_BxLxV = _forward(s_model, params, batch)
      ce = losses.cross_entropy(s_logits_BxLxV, batch["targets"], batch["mask"])
      return ce, {"loss": ce, "hard_loss": ce, "num_tokens": jnp.sum(batch["mask"])}
    knobs = distill.at(step)
    if cached:
      with sharding.activation_rules(rules):
        s_logits_BxLxV = _forward(s_model, params, batch)
      if distill.cache_vocab_size:  # the cache's ids index the shared vocabulary only
        s_logits_BxLxV = s_logits_BxLxV[..., :distill.cache_vocab_size]
      return cache_losses.distillation_loss(
          s_logits_BxLxV, batch, batch["targets"], batch["mask"],
          estimator=distill.cache_estimator, temperature=knobs["temperature"],
          alpha=knobs["alpha"])
    loss_name, alpha = ("generalized_jsd", 1.0) if on_policy else (distill.loss, knobs["alpha"])
    t_out, t_feats = t_out if plan is not None else (t_out, None)
    s_out, s_feats = forward(params, batch)
    if chunked:
      (t_hidden_BxLxD, t_unembed_DxV), s_hidden_BxLxD = t_out, s_out
      s_unembed_DxV, t_unembed_DxV = losses.shared_vocab(unembedding(s_cfg, params),
                                                         t_unembed_DxV)
      loss, metrics = losses.chunked_distillation_loss(
          s_hidden_BxLxD, s_unembed_DxV, t_hidden_BxLxD, t_unembed_DxV,
          batch["targets"], batch["mask"], loss=loss_name, temperature=knobs["temperature"],
          alpha=alpha, beta=distill.beta, skew=distill.skew,
          chunk_size=distill.loss_chunk_size, s_logit_softcap=s_cfg.logit_softcap,
          t_logit_softcap=t_softcap)
    else:
      s_logits_BxLxV, t_logits_BxLxV = losses.shared_vocab(s_out, t_out)
      loss, metrics = losses.distillation_loss(
          s_logits_BxLxV, t_logits_BxLxV, batch["targets"], batch["mask"], loss=loss_name,
          temperature=knobs["temperature"], alpha=alpha, beta=distill.beta,
          skew=distill.skew)
    if plan is None:
      return loss, metrics
    terms = features.feature_losses(plan, s_feats, t_feats,
                                    aux_params["projection"] if plan.projection else None,
                                    batch["mask"])
    if plan.hidden:
      loss = loss + knobs["feature_weight"] * terms["feature_loss"]
    if plan.attention:
      loss = loss + distill.attention_weight * terms["attention_loss"]
    return loss, dict(metrics, loss=loss, **terms)

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

  With feature distillation between widths the optimizer updates (params, aux_params) together:
  one global-norm clip, one NaN guard; the state must come from create_train_state(..., t_cfg=,
  distill=). Scheduled settings are logged as metrics 'alpha', 'temperature', 'feature_weight'.

  With a teacher cache (`distill.cache_estimator`) there is no teacher: t_cfg must be None, and
  every batch carries its cached t_* arrays. With `distill.on_policy` (kdjax.gkd) each step's
  batch (all its micro-batches) is, with probability lambda, replaced by the student's own
  samples, drawn with keys derived from state.rng; the metric 'on_policy' is 1 on such steps.
  """
  if t_cfg is not None and distill is None:
    raise ValueError("make_train_step: a teacher needs DistillSettings.")
  cached = distill is not None and bool(distill.cache_estimator)
  if cached and t_cfg is not None:
    raise ValueError("make_train_step: a teacher cache replaces the teacher; pass t_cfg=None.")
  on_policy = distill.on_policy if distill is not None else None
  if on_policy is not None and (t_cfg is None or cached):
    raise ValueError("make_train_step: on-policy distillation needs a live teacher (t_cfg).")
  if on_policy is not None and not on_policy.vocab_size:  # ids both models can score
    on_policy = dataclasses.replace(on_policy,
                                    vocab_size=min(s_cfg.vocab_size, t_cfg.vocab_size))
  chunked = distill is not None and distill.loss_chunk_size > 0
  plan = features.make_plan(distill, s_cfg, t_cfg)
  teacher_forward = (make_teacher_forward(t_cfg, t_rules, final_hidden=chunked, plan=plan)
                     if t_cfg is not None else None)
  student_loss = make_student_loss(s_cfg, distill, rules,
                                   t_softcap=t_cfg.logit_softcap if t_cfg else 0.0, t_cfg=t_cfg)
  with_aux = plan is not None and plan.projection

  def trainable_loss(trainable, batch: Batch, t_out, step, is_on_policy):
    params, aux_params = trainable if with_aux else (trainable, None)
    return student_loss(params, batch, t_out, aux_params, step, is_on_policy)

  grad_fn = jax.value_and_grad(trainable_loss, has_aux=True, argnums=0)

  def grads_on(trainable, teacher_params, batch: Batch, step, is_on_policy=False):
    # The teacher runs outside value_and_grad: only the student's loss is differentiated.
    t_out = teacher_forward(teacher_params, batch) if teacher_forward else None
    (_, metrics), grads = grad_fn(trainable, batch, t_out, step, is_on_policy)
    return grads, metrics

  def micro_step(trainable, teacher_params, batch: Batch, step, is_on_policy, sample_key):
    if on_policy is None:
      return grads_on(trainable, teacher_params, batch, step)

    def student_samples():
      params = trainable[0] if with_aux else trainable
      samples = gkd.student_batch(s_cfg, params, batch, sample_key, on_policy, rules)
      grads, metrics = grads_on(trainable, teacher_params, samples, step, True)
      return grads, dict(metrics, on_policy=jnp.ones((), jnp.float32))

    def data():
      grads, metrics = grads_on(trainable, teacher_params, batch, step)
      return grads, dict(metrics, on_policy=jnp.zeros((), jnp.float32))

    return jax.lax.cond(is_on_policy, student_samples, data)

  def train_step(state: TrainState, teacher_params, batch: Batch):
    if with_aux and state.aux_params is None:
      raise ValueError("train_step: feature distillation between widths needs the projection; "
                       "build the state with create_train_state(..., t_cfg=, distill=).")
    trainable = _trainable(state.params, state.aux_params if with_aux else None)
    # The sibling of the next state's key (new_rng below): the on-policy coin, one per step (so
    # accumulation does not change lambda), and the samples, their own per micro-batch.
    coin_key, sample_key = jax.random.split(jax.random.split(
        jax.random.wrap_key_data(state.rng))[1])
    is_on_policy = (gkd.coin(coin_key, on_policy.fraction) if on_policy is not None
                    else jnp.zeros((), bool))
    if grad_accum_steps == 1:
      grads, metrics = micro_step(trainable, teacher_params, batch, state.step, is_on_policy,
                                  sample_key)
    else:
      # Strided split (rows i, i + A, ...): with the batch sharded over devices, every device
      # holds a slice of every micro-batch, so no device idles while others work.
      micro = jax.tree.map(
          lambda x: x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps,
                              *x.shape[1:]).swapaxes(0, 1), batch)
      # Token sums, divided by the token count at the end: an on-policy step (kdjax.gkd) scores
      # its own number of tokens, so the data batch's count cannot be the divisor.
      def body(acc, mb_i):
        mb, i = mb_i
        grads, metrics = micro_step(trainable, teacher_params, mb, state.step, is_on_policy,
                                    jax.random.fold_in(sample_key, i))
        n = metrics["num_tokens"]
        sums = jax.tree.map(lambda a, x: a + n * x, acc[0], (grads, metrics))
        return (sums, acc[1] + n), None

      zeros = jax.eval_shape(micro_step, trainable, teacher_params,
                             jax.tree.map(lambda x: x[0], micro), state.step, is_on_policy,
                             sample_key)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
      ((grads, metrics), n_total), _ = jax.lax.scan(
          body, (zeros, jnp.zeros((), jnp.float32)), (micro, jnp.arange(grad_accum_steps)))
      grads, metrics = jax.tree.map(lambda x: x / jnp.maximum(n_total, 1.0), (grads, metrics))
      metrics["num_tokens"] = n_total
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    grad_norm = optax.global_norm(grads)
    # NaN/Inf guard: a non-finite loss or gradient keeps the old params and optimizer state (the
    # batch counts as consumed), so one bad batch cannot poison the run or a checkpoint.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    keep_new = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_trainable, opt_state = keep_new((new_trainable, opt_state), (trainable, state.opt_state))
    params, aux_params = new_trainable if with_aux else (new_trainable, state.aux_params)
    skipped = state.skipped_steps + (~finite).astype(jnp.int32)
    streak = jnp.where(finite, 0, state.nonfinite_streak + 1).astype(jnp.int32)
    metrics = dict(metrics, grad_norm=grad_norm,
                   learning_rate=jnp.asarray(schedule(state.step), jnp.float32),
                   skipped_steps=skipped.astype(jnp.float32),
                   nonfinite_streak=streak.astype(jnp.float32))
    if distill is not None:  # the scheduled settings this step used
      knobs = distill.at(state.step)
      metrics.update({name: jnp.asarray(knobs[name], jnp.float32) for name in distill.scheduled})
    new_rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=new_rng,
                         skipped_steps=skipped, nonfinite_streak=streak,
                         aux_params=aux_params), metrics

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
