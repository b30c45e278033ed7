"""Checks a run's config before anything is built or compiled.

Each problem raises `ConfigError` whose message is one line naming the field and the fix; main.py
prints it without a traceback. kdjax.preflight runs these checks of values first, then its checks
of the files a run reads. Type errors and unknown keys in `--config.x=y` overrides are
already refused by ml_collections' locked config at flag parsing.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax.numpy as jnp

from kdjax import losses, qwix_model, schedules, sharding
from kdjax.blockwise_attention import ATTENTION_IMPLS
from kdjax.data import records, sources
from kdjax.model import ACTIVATIONS, NORMS, POSITION_EMBEDDINGS, REMAT_POLICIES, ModelConfig
from kdjax.settings import FrozenTeacher, TrainSettings, distill_fields, student_model
from kdjax.teacher_cache import estimators as cache_estimators

MODES = ("experiment", "teacher", "distill", "scratch", "eval")

_TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainSettings)}
# Each schedulable field: its range as (check, wording) for the plain value and the schedule end.
_SCHEDULED = {
    "alpha": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "temperature": (lambda v: v > 0, "must be positive"),
    "feature_weight": (lambda v: v >= 0, "must be >= 0"),
}


class ConfigError(ValueError):
  """A bad config value; str(e) is the whole message for the user."""


def _require(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"config.{field}: {message}")


def _is_float_dtype(value: Any) -> bool:
  try:
    return jnp.issubdtype(jnp.dtype(value), jnp.floating)
  except TypeError:
    return False


def check_model(cfg: Any, prefix: str) -> ModelConfig:
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(cfg.keys()) - names)
  _require(not unknown, f"{prefix}.{unknown[0] if unknown else ''}",
           f"unknown model field; valid fields are {sorted(names)}.")
  m = ModelConfig.from_dict(cfg)
  for field in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
                "max_len"):
    _require(getattr(m, field) > 0, f"{prefix}.{field}", "must be a positive integer.")
  _require(m.head_dim > 0 or m.d_model % m.num_heads == 0, f"{prefix}.num_heads",
           f"{m.num_heads} does not divide d_model={m.d_model}; pick a divisor or set head_dim.")
  _require(m.num_heads % m.num_kv_heads == 0, f"{prefix}.num_kv_heads",
           f"{m.num_kv_heads} does not divide num_heads={m.num_heads}; pick a divisor.")
  _require(m.head_size % 2 == 0, f"{prefix}.head_dim",
           f"RoPE needs an even head dim, got {m.head_size}.")
  _require(m.activation in ACTIVATIONS, f"{prefix}.activation",
           f"unknown {m.activation!r}; use one of {ACTIVATIONS}.")
  _require(m.norm in NORMS, f"{prefix}.norm", f"unknown {m.norm!r}; use one of {NORMS}.")
  _require(m.remat_policy in REMAT_POLICIES, f"{prefix}.remat_policy",
           f"unknown {m.remat_policy!r}; use one of {REMAT_POLICIES}.")
  _require(m.attention_impl in ATTENTION_IMPLS, f"{prefix}.attention_impl",
           f"unknown {m.attention_impl!r}; use one of {ATTENTION_IMPLS}.")
  _require(isinstance(m.attention_block_size, int) and m.attention_block_size > 0,
           f"{prefix}.attention_block_size",
           "must be a positive number of positions (blockwise attention's block).")
  _require(m.attention_impl != "cudnn" or (m.attn_softcap == 0 and m.dtype in (
      "bfloat16", "float16")), f"{prefix}.attention_impl",
           "'cudnn' needs dtype bfloat16 or float16 and no attn_softcap; use 'blockwise' or 'xla'.")
  for field in ("dtype", "param_dtype"):
    value = getattr(m, field)
    _require(_is_float_dtype(value), f"{prefix}.{field}",
             f"{value!r} is not a float dtype; use float32 or bfloat16.")
  for field in ("logit_softcap", "attn_softcap", "query_scale", "sliding_window", "global_every",
                "rope_scaling"):
    _require(getattr(m, field) >= 0, f"{prefix}.{field}", "must be >= 0 (0 disables it).")
  _require(m.position_embedding in POSITION_EMBEDDINGS, f"{prefix}.position_embedding",
           f"unknown {m.position_embedding!r}; use one of {POSITION_EMBEDDINGS}.")
  _require(m.rope_scaling == 0 or m.rope_high_freq_factor > m.rope_low_freq_factor,
           f"{prefix}.rope_high_freq_factor",
           "must be above rope_low_freq_factor (Llama 3 uses 4 and 1).")
  return m


def check_train(tc: Any, prefix: str, batch_size: int, dp: int) -> None:
  unknown = sorted(set(tc.keys()) - _TRAIN_KEYS)
  _require(not unknown, f"{prefix}.{unknown[0] if unknown else ''}",
           f"unknown training field; valid fields are {sorted(_TRAIN_KEYS)}.")
  _require(tc.steps > 0, f"{prefix}.steps", "must be positive.")
  _require(tc.learning_rate > 0, f"{prefix}.learning_rate", "must be positive.")
  _require(tc.grad_clip > 0, f"{prefix}.grad_clip", "must be positive (global-norm clip).")
  _require(tc.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0.")
  _require(0 <= tc.end_lr_fraction <= 1, f"{prefix}.end_lr_fraction", "must be in [0, 1].")
  for b in ("b1", "b2"):
    _require(0 <= tc[b] < 1, f"{prefix}.{b}", f"Adam's {b} must be in [0, 1).")
  _require(0 <= tc.warmup_steps <= tc.steps, f"{prefix}.warmup_steps",
           f"must be in [0, steps={tc.steps}].")
  _require(tc.get("loss_chunk_size", 0) >= 0, f"{prefix}.loss_chunk_size",
           "must be >= 0 (0 = whole logits; > 0 = tokens per chunk of the cross-entropy).")
  accum = tc.grad_accum_steps
  _require(accum >= 1 and (batch_size // dp) % accum == 0, f"{prefix}.grad_accum_steps",
           f"{accum} must divide the per-device batch {batch_size // dp}.")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  """{'a.b': value} for a nested dict or ConfigDict."""
  out = {}
  for k, v in dict(d).items():
    key = f"{prefix}{k}"
    if isinstance(v, dict) or hasattr(v, "keys"):
      out.update(flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def _check_rules(rules: Any, field: str) -> None:
  """Each rule is [logical_name, mesh axis | list of mesh axes | None]."""
  for rule in rules or ():
    ok = isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)
    axes = rule[1] if ok else None
    axes = list(axes) if isinstance(axes, (list, tuple)) else [axes]
    _require(ok and all(a is None or a in sharding.MESH_AXES for a in axes), field,
             f"bad rule {rule!r}; write [logical_name, mesh_axis] with mesh axes from "
             f"{sharding.MESH_AXES}, a list of them, or None.")


def _check_frozen_teacher(config: Any) -> None:
  frozen = FrozenTeacher.from_config(config)
  for field in ("dtype", "param_dtype"):
    value = getattr(frozen, field)
    _require(value == "" or _is_float_dtype(value), f"frozen_teacher.{field}",
             f"{value!r} is not a float dtype; use '' (as trained), float32 or bfloat16.")
  _check_rules(frozen.sharding_rules, "frozen_teacher.sharding_rules")


def _check_features(d: dict[str, Any], teacher: ModelConfig, student: ModelConfig) -> None:
  """Feature-distillation fields of config.distill (kdjax.features); `d` has every field
  (settings.distill_fields)."""
  for field in ("feature_weight", "attention_weight"):
    _require(d[field] >= 0, f"distill.{field}", f"must be >= 0 (0 = off), got {d[field]}.")
  kind = d["feature_loss"]
  _require(kind in losses.HIDDEN_LOSSES, "distill.feature_loss",
           f"unknown {kind!r}; use one of {losses.HIDDEN_LOSSES}.")
  for pair in d["feature_layers"]:
    ok = (isinstance(pair, (list, tuple)) and len(pair) == 2
          and all(isinstance(x, int) and not isinstance(x, bool) for x in pair))
    _require(ok, "distill.feature_layers",
             f"bad pair {pair!r}; write ((student_layer, teacher_layer), ...) with integers.")
    _require(0 <= pair[0] < student.num_layers and 0 <= pair[1] < teacher.num_layers,
             "distill.feature_layers",
             f"pair {tuple(pair)} is out of range: student layers are 0..{student.num_layers - 1}"
             f", teacher layers 0..{teacher.num_layers - 1}.")


def _check_schedules(d: dict[str, Any]) -> None:
  """The loss schedules of config.distill (kdjax.schedules)."""
  for name, (in_range, wording) in _SCHEDULED.items():
    sched, field = d[f"{name}_schedule"], f"distill.{name}_schedule"
    _require(sched["kind"] in schedules.KINDS, f"{field}.kind",
             f"unknown {sched['kind']!r}; use one of {schedules.KINDS}.")
    if sched["kind"] == "constant":
      continue  # end and steps are unused
    _require(in_range(sched["end"]), f"{field}.end",
             f"{wording} like distill.{name} (got {sched['end']}).")
    _require(sched["steps"] >= 0, f"{field}.steps",
             f"must be >= 0 (0 = the whole phase), got {sched['steps']}.")


def _check_teacher_sources(d: dict[str, Any], seq_len: int) -> None:
  """The teacher cache, on-policy and sequence-level fields of config.distill; `d` has every
  field (settings.distill_fields)."""
  fraction = d["on_policy_fraction"]
  _require(0 <= fraction <= 1, "distill.on_policy_fraction",
           f"must be in [0, 1] (0 = off), got {fraction}.")
  if fraction > 0:
    p, n = d["on_policy_prompt_tokens"], d["on_policy_new_tokens"]
    _require(1 <= p <= seq_len, "distill.on_policy_prompt_tokens",
             f"{p} must be in [1, data.seq_len={seq_len}].")
    _require(0 <= n <= seq_len + 1 - p, "distill.on_policy_new_tokens",
             f"{n} must be in [0, data.seq_len + 1 - on_policy_prompt_tokens = "
             f"{seq_len + 1 - p}] (0 fills the row).")
    _require(d["on_policy_temperature"] > 0, "distill.on_policy_temperature",
             "must be positive (the student samples; 1 is its own distribution).")
  if not d["teacher_cache"]:
    return
  estimator = d["cache_estimator"]
  _require(estimator in cache_estimators.NEEDS, "distill.cache_estimator",
           f"unknown {estimator!r}; use one of {tuple(cache_estimators.NEEDS)}.")
  clash = [("loss", d["loss"] != "forward_kl", "the cache estimators estimate forward_kl"),
           ("loss_chunk_size", d["loss_chunk_size"] > 0, "it chunks live teacher logits"),
           ("feature_weight", d["feature_weight"] > 0, "hidden states are not cached"),
           ("attention_weight", d["attention_weight"] > 0, "attention maps are not cached"),
           ("on_policy_fraction", fraction > 0, "the student's samples need a live teacher"),
           ("sequence_data", bool(d["sequence_data"]),
            "the cache holds the train split's batches")]
  for field, bad, why in clash:
    _require(not bad, "distill.teacher_cache",
             f"cannot be combined with distill.{field}={d[field]!r} ({why}); set "
             "teacher_cache='' for a live teacher or restore that field's default.")
  _require(estimator != "sampled" or d["temperature_schedule"]["kind"] == "constant",
           "distill.temperature_schedule",
           "the 'sampled' cache estimator is unbiased only at the temperature its draws were "
           "made at; keep the temperature constant or use a top-k estimator.")


def _check_run_settings(config: Any) -> None:
  if config.wandb.enabled:
    import importlib.util
    _require(importlib.util.find_spec("wandb") is not None, "wandb.enabled",
             "Weights & Biases is not installed; `pip install wandb` (and `wandb login`), or "
             "leave it False (TensorBoard and metrics.jsonl are always written).")
  for field in ("log_every", "checkpoint_every", "keep_checkpoints", "nonfinite_patience"):
    _require(config[field] >= 1, field, f"must be >= 1 (got {config[field]}).")
  for field in ("eval_batches", "val_batches"):
    _require(config.data[field] >= 1, f"data.{field}", f"must be >= 1 (got {config.data[field]}).")
  _require(config.data.get("eval_chunk_size", 0) >= 0, "data.eval_chunk_size",
           "must be >= 0 (0 = whole batches; > 0 = tokens per chunk of the logits).")
  _require(0 <= config.num_samples <= len(config.sample_prompts), "num_samples",
           f"must be in [0, len(sample_prompts)={len(config.sample_prompts)}].")
  _require(config.sample_temperature >= 0, "sample_temperature", "must be >= 0 (0 is greedy).")
  _require(0 <= config.sample_top_k <= config.student.vocab_size, "sample_top_k",
           f"must be in [0, vocab_size] (0 disables top-k), got {config.sample_top_k}.")


def _check_loss(d: dict[str, Any]) -> None:
  _require(d["loss"] in losses.DIVERGENCES, "distill.loss",
           f"unknown loss {d['loss']!r}; use one of {sorted(losses.DIVERGENCES)}.")
  _require(d["temperature"] > 0, "distill.temperature",
           f"must be positive (got {d['temperature']}); 1 is plain softmax, 2-4 softens targets.")
  _require(0 <= d["alpha"] <= 1, "distill.alpha",
           f"must be in [0, 1] (got {d['alpha']}); it weights the soft loss against cross-entropy.")
  _require(0 <= d["beta"] <= 1, "distill.beta", f"must be in [0, 1] (got {d['beta']}).")
  _require(0 <= d["skew"] < 1, "distill.skew", f"must be in [0, 1) (got {d['skew']}).")
  _require(d["loss_chunk_size"] >= 0, "distill.loss_chunk_size",
           f"must be >= 0 (0 = unchunked), got {d['loss_chunk_size']}.")


def _check_data_source(data: Any) -> None:
  """Your-own-data fields: choices, fractions, and which fields go together."""
  for field, choices in (("format", ("",) + records.FORMATS), ("train_on", records.TRAIN_ON),
                         ("txt_unit", sources.TXT_UNITS)):
    _require(data[field] in choices, f"data.{field}",
             f"{data[field]!r} is not one of {choices}.")
  _require(not (data.train_files and data.hf_dataset), "data.hf_dataset",
           "give data.train_files or data.hf_dataset, not both.")
  for field in ("eval_files", "val_files"):
    _require(not data[field] or data.train_files, f"data.{field}",
             "needs data.train_files (the training records); set it too.")
  for field in ("eval_fraction", "val_fraction"):
    _require(0 <= data[field] < 1, f"data.{field}", f"must be in [0, 1), got {data[field]}.")
  _require(data.eval_fraction + data.val_fraction < 1, "data.eval_fraction",
           "data.eval_fraction + data.val_fraction must be below 1.")
  _require(0 <= data.mix_weight < 1, "data.mix_weight",
           f"must be in [0, 1) (the fraction of training records from data.mix_files), got "
           f"{data.mix_weight}.")
  _require(bool(data.mix_files) == (data.mix_weight > 0), "data.mix_weight",
           "data.mix_files and data.mix_weight > 0 go together; set both or neither.")
  _require(not data.mix_files or data.train_files or data.hf_dataset, "data.mix_files",
           "mixes into your own train records; set data.train_files or data.hf_dataset too.")


def _check_data(data: Any, teacher: ModelConfig, student: ModelConfig) -> None:
  _check_data_source(data)
  # Vocabularies may differ by padding rows only: every tokenizer id must index both models.
  _require(data.vocab_size <= teacher.vocab_size, "data.vocab_size",
           f"{data.vocab_size} is above teacher.vocab_size={teacher.vocab_size}; set it to the "
           "tokenizer's size (a trained tokenizer gets data.vocab_size ids).")
  _require(data.vocab_size <= student.vocab_size, "student.vocab_size",
           f"{student.vocab_size} is below the tokenizer's {data.vocab_size} ids "
           f"(data.vocab_size); teacher and student must share one tokenizer.")
  if teacher.vocab_size != student.vocab_size:
    print(f"kdjax: teacher.vocab_size={teacher.vocab_size} and student.vocab_size="
          f"{student.vocab_size} differ by padding rows past the tokenizer's {data.vocab_size} "
          f"ids; the loss compares the first {min(teacher.vocab_size, student.vocab_size)}.",
          file=sys.stderr)
  for name, m in (("teacher", teacher), ("student", student)):
    _require(data.seq_len <= m.max_len, "data.seq_len",
             f"{data.seq_len} is above {name}.max_len={m.max_len}; lower seq_len or raise max_len.")
  _require(data.seq_len > 0 and data.batch_size > 0, "data.batch_size",
           "batch_size and seq_len must be positive.")


def _check_placement(config: Any, num_devices: int, num_processes: int) -> int:
  """The mesh over `num_devices`, and the batches and data streams over it; returns the
  data-parallel size (mesh.data x mesh.fsdp)."""
  data = config.data
  try:
    mesh = sharding.mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  dp = mesh[0] * mesh[1]
  for field in ("batch_size", "eval_batch_size"):
    _require(data[field] % dp == 0, f"data.{field}",
             f"{data[field]} is not divisible by the data-parallel size {dp} "
             "(mesh.data x mesh.fsdp); use a multiple of it.")
  shards = int(data.num_shards)
  _require(shards >= 1 and data.batch_size % shards == 0, "data.num_shards",
           f"{shards} must be >= 1 and divide batch_size={data.batch_size}.")
  _require(shards % num_processes == 0, "data.num_shards",
           f"{shards} is not a multiple of the {num_processes} processes; set it to a multiple "
           f"(each process reads num_shards / {num_processes} of the data streams).")
  return dp


def check_config(config: Any, num_devices: int, num_processes: int = 1) -> None:
  """Raises ConfigError on the first problem found."""
  _require(config.mode in MODES, "mode", f"unknown {config.mode!r}; use one of {MODES}.")
  d = distill_fields(config.distill)
  _check_loss(d)
  teacher = check_model(config.teacher, "teacher")
  student = check_model(config.student, "student")
  try:
    qwix_model.check(student_model(config))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _check_features(d, teacher, student)
  _check_schedules(d)
  _check_teacher_sources(d, config.data.seq_len)
  _check_data(config.data, teacher, student)
  dp = _check_placement(config, num_devices, num_processes)
  _check_rules(config.sharding_rules, "sharding_rules")
  _check_frozen_teacher(config)
  check_train(config.teacher_train, "teacher_train", config.data.batch_size, dp)
  check_train(config.student_train, "student_train", config.data.batch_size, dp)
  _check_run_settings(config)
