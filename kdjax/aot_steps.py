"""Every compiled program a config runs, built from abstract arrays on any mesh: the training
step of each phase, evaluation, validation and sampling, each with its arguments as
`jax.ShapeDtypeStruct`s carrying the shardings the run would give them.

The same functions and shardings as a run (kdjax.train, kdjax.evaluate, kdjax.sample), so that
what kdjax.aot compiles for a target, or what `jax.eval_shape` traces on an AbstractMesh, is what
the run would compile there; nothing reads the config's files or allocates a parameter.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import evaluate, experiment, flops, optim, preflight, sample, settings, sharding, train
from kdjax.config_check import ConfigError
from kdjax.model import ModelConfig, Transformer
from kdjax.settings import DataSettings, DistillSettings, TrainSettings
from kdjax.state import abstract_train_state

TRAINED = ("teacher", "distilled", "scratch")
_BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "mask")
# Sampling's prompts are tokenized text, unknown without the tokenizer: this many tokens each.
SAMPLE_PROMPT_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class Program:
  """A jitted function, its abstract arguments, and what the shardings say each device holds."""

  phase: str
  fn: Any  # jax.jit-wrapped: fn.lower(*args, **kwargs)
  args: tuple
  mesh: Any
  kwargs: dict = dataclasses.field(default_factory=dict)
  state: int = 0  # bytes per device: the trained (or evaluated) model's params (+ opt state)
  teacher: int = 0  # the frozen teacher's params
  batch: int = 0  # the batch
  flops: float = 0.0  # per step, all devices (kdjax.flops); 0 where it is not a fixed count
  trains: bool = False  # a training step (its MFU is the run's)


def phases(config) -> tuple[str, ...]:
  """The trained phases config.mode runs, plus 'distilled' whenever there is a teacher to
  distill from (trained in this run, a checkpoint or a Hugging Face model: only a plain
  'scratch' run has none; 'eval' trains nothing but holds the same frozen teacher), plus
  'scratch' beside 'distilled': the baseline every distillation is compared with."""
  run = preflight.phases_to_run(config)
  has_teacher = (config.mode != "scratch" or config.teacher_checkpoint
                 or config.get("teacher_hf", ""))
  wanted = set(run) | ({"distilled", "scratch"} if has_teacher else set())
  return tuple(p for p in experiment.PHASES if p in wanted)


def _sharded(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _batch(mesh, rows: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct((rows, seq_len), jnp.float32 if k == "mask" else jnp.int32,
                                  sharding=sharding.batch_sharding(mesh)) for k in _BATCH_KEYS}


def _bytes(tree) -> int:
  return sharding.per_device_bytes(tree, jax.tree.map(lambda x: x.sharding, tree))


def _params(cfg: ModelConfig, mesh, rules):
  like = jax.eval_shape(lambda: Transformer(cfg).init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  return _sharded(nn.meta.unbox(like), sharding.logical_shardings(like, mesh, rules))


def frozen_teacher(config, mesh, rules) -> tuple[ModelConfig, Any, Any]:
  """(t_cfg, t_rules, abstract params) of the teacher as distillation and evaluation hold it:
  frozen_teacher's dtypes and sharding rules."""
  t_cfg, t_rules = experiment.frozen_teacher_settings(config, rules)
  return t_cfg, t_rules, _params(t_cfg, mesh, t_rules)


def _distilled_teacher(config, steps: int):
  """The distillation settings of the run, or ConfigError where the step needs inputs that
  only the run's files give (an offline teacher cache rides in the batches)."""
  distill = DistillSettings.from_config(config.distill).resolved(steps)
  if distill.cache_estimator:
    raise ConfigError("config.distill.teacher_cache: compiling a step that reads an offline "
                      "teacher cache is not supported; compile without it (the live teacher's "
                      "step is the larger).")
  return distill


def train_program(config, mesh, rules, phase: str) -> Program:
  """The whole training step of `phase` ('teacher', 'distilled' or 'scratch'), as
  kdjax.experiment runs it: distillation from the frozen teacher unless its settings need no
  teacher (cross-entropy alone)."""
  if phase == "teacher":
    model_cfg, tc = ModelConfig.from_dict(config.teacher), config.teacher_train
  else:
    model_cfg, tc = settings.student_model(config), config.student_train
  ts = TrainSettings.from_config(tc)
  tx = optim.make_optimizer(ts)
  t_cfg = t_rules = t_params = distill = None
  if phase == "distilled":
    distill = _distilled_teacher(config, ts.steps)
    if distill.uses_teacher:
      t_cfg, t_rules, t_params = frozen_teacher(config, mesh, rules)
    else:
      distill = None
  # With the teacher's settings: feature distillation between widths adds its projection.
  like, state_sh = abstract_train_state(model_cfg, tx, 0, mesh, rules, t_cfg=t_cfg,
                                        distill=distill)
  state = _sharded(like, state_sh)
  step = train.make_train_step(model_cfg, tx, optim.make_schedule(ts), t_cfg=t_cfg,
                               distill=distill, grad_accum_steps=ts.grad_accum_steps,
                               rules=rules, t_rules=t_rules,
                               loss_chunk_size=ts.loss_chunk_size)
  shardings_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  jitted = train.jit_train_step(step, shardings_of(state), shardings_of(t_params), mesh).jitted
  d = config.data
  batch = _batch(mesh, d.batch_size, d.seq_len)
  tokens = d.batch_size * d.seq_len
  return Program(phase, jitted, (state, t_params, batch), mesh, state=_bytes(state),
                 teacher=_bytes(t_params) if t_params else 0, batch=_bytes(batch),
                 flops=tokens * flops.flops_per_token(model_cfg, t_cfg, d.seq_len), trains=True)


def val_program(config, mesh, rules, model: str) -> Program:
  """Validation of `model` ('teacher' or 'student') as its phase trains it."""
  cfg = (ModelConfig.from_dict(config.teacher) if model == "teacher"
         else settings.student_model(config).plain)
  params = _params(cfg, mesh, rules)
  d = DataSettings.from_config(config.data)
  batch = _batch(mesh, d.eval_batch_size, d.seq_len)
  return Program(f"val ({model})", evaluate.make_loss_sums_step(cfg, rules, d.eval_chunk_size),
                 (params, batch), mesh, state=_bytes(params), batch=_bytes(batch),
                 flops=d.eval_batch_size * d.seq_len
                 * flops.forward_flops_per_token(cfg, d.seq_len))


def eval_programs(config, mesh, rules, model: str) -> list[Program]:
  """Evaluation against the frozen teacher and sampling of `model` as the final table runs them
  (kdjax.experiment.evaluate_phases): the teacher as frozen_teacher holds it, a student in float
  (a quantized or LoRA student's evaluated form is no larger)."""
  t_cfg, t_rules, t_params = frozen_teacher(config, mesh, rules)
  if model == "teacher":
    cfg, model_rules, params = t_cfg, t_rules, t_params
  else:
    cfg, model_rules = settings.student_model(config).plain, rules
    params = _params(cfg, mesh, rules)
  d = DataSettings.from_config(config.data)
  batch = _batch(mesh, d.eval_batch_size, d.seq_len)
  out = [Program(
      f"eval ({model})",
      evaluate.make_eval_step(cfg, t_cfg, model_rules, t_rules, d.eval_chunk_size),
      (params, t_params, batch), mesh, state=_bytes(params), batch=_bytes(batch),
      teacher=0 if model == "teacher" else _bytes(t_params),
      flops=d.eval_batch_size * d.seq_len * (flops.forward_flops_per_token(cfg, d.seq_len)
                                             + flops.forward_flops_per_token(t_cfg, d.seq_len)))]
  if config.num_samples:
    rep = sharding.replicated(mesh)
    rows = int(config.num_samples)
    prompt = jax.ShapeDtypeStruct((rows, SAMPLE_PROMPT_TOKENS), jnp.int32, sharding=rep)
    lengths = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=rep)
    key = jax.ShapeDtypeStruct(jax.random.key_data(jax.random.key(0)).shape, jnp.uint32,
                               sharding=rep)
    out.append(Program(
        f"sample ({model})", sample.generate_step, (params, prompt, lengths, key), mesh,
        kwargs=dict(cfg=cfg, max_new_tokens=int(config.sample_tokens),
                    temperature=float(config.sample_temperature),
                    top_k=int(config.sample_top_k) or None, top_p=None),
        state=_bytes(params)))
  return out


def programs(config, mesh) -> list[Program]:
  """Every program the config runs on `mesh`: its phases' training steps, validation of each
  trained model, then, wherever there is a teacher, the final table's evaluation and sampling of
  the student and the teacher (mode 'eval' runs them after any mode that trains)."""
  rules = sharding.rules_from_config(config)
  run = phases(config)
  out = [train_program(config, mesh, rules, p) for p in run]
  if "teacher" in run:
    out.append(val_program(config, mesh, rules, "teacher"))
  if set(run) & {"distilled", "scratch"}:
    out.append(val_program(config, mesh, rules, "student"))
  if "distilled" in run:  # there is a teacher to evaluate against
    out += eval_programs(config, mesh, rules, "student")
    out += eval_programs(config, mesh, rules, "teacher")
  return out
