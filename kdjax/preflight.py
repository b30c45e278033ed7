"""Every check before any work: the config's values, then the files and checkpoints a run reads.

`preflight(config, workdir)` is called by the CLI (kdjax.main), experiment.run, the ablation
runner and the scripts before they build data, load a model or compile a step. Each problem raises
ConfigError, whose message is one line that names the config field and the fix. Nothing here
writes: a refused run leaves the workdir, the teacher's checkpoint and every cache as they were.

Checked here: the values (kdjax.config_check), that no phase resumes a run made with other math
settings, that a teacher to load (checkpoint or Hugging Face directory) and a student init exist
and fit the config, that all given tokenizers are one tokenizer that fits both models, and that a
teacher cache or teacher-written data belongs to this run. A tokenizer that the run trains itself
is checked against the models once it exists (check_vocab, from experiment.prepare_data).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax

from kdjax import checkpoint, config_check, hf, teacher_cache
from kdjax.blockwise_attention import ATTENTION_KERNEL_FIELDS
from kdjax.config_check import ConfigError
from kdjax.data import hf_tokenizer, teacher_text
from kdjax.model import LoraConfig, ModelConfig, QuantConfig
from kdjax.settings import ModelSources, TeacherSources

# The config groups whose values decide what a phase computes. A phase resumes only if these are
# unchanged; everything else (logging, checkpoint cadence, eval and sampling settings, the mesh,
# where the data lives) may change between runs. An entry is a top-level group or one field of
# one ("task.mix_weight").
_TEACHER_SOURCE = ("teacher", "teacher_train", "teacher_checkpoint", "teacher_hf")
# A task run (kdjax.task): its data is generated from task_data or read from task.*_files, its
# students learn the teacher's answers (seq), their recorded log-probs (logits) and a labelled
# mix (mixed); scoring and speed settings (extractor, marker, speed_*) alter no phase.
_TASK_DATA = ("task_data", "task.generate", "task.val_files")
_STUDENT = ("student", "student_quant", "student_lora", "student_train", "student_init")
_TASK_STUDENT = ("seed", "data", *_STUDENT, *_TASK_DATA,
                 "task.labelled_files")
_TASK_ANSWERS = (*_TASK_STUDENT, *_TEACHER_SOURCE, "frozen_teacher", "task.teacher_files",
                 "task.prompt_files", "task.max_new_tokens", "task.answer_batch_size")
PHASE_FIELDS = {
    "teacher": ("seed", "data", "teacher", "teacher_train", *_TASK_DATA, "task.teacher_files"),
    "distilled": ("seed", "data", *_STUDENT, "distill", *_TEACHER_SOURCE, "frozen_teacher"),
    "scratch": ("seed", "data", *_STUDENT),
    "labelled": _TASK_STUDENT,
    "seq": _TASK_ANSWERS,
    "logits": (*_TASK_ANSWERS, "distill", "task.record_topk"),
    "mixed": (*_TASK_ANSWERS, "distill", "task.record_topk", "task.mix_weight"),
}
_NON_MATH_DATA = {"data.data_dir", "data.archive", "data.eval_split", "data.eval_batch_size",
                  "data.eval_batches", "data.val_split", "data.val_batches",
                  "data.eval_chunk_size"}
# Distill fields added after runs were first saved, at the values that reproduced those runs
# then. Frozen on purpose, not read from settings: a later change of a default must not make an
# old run look resumable with other math.
_DISTILL_DEFAULTS = {
    "distill.feature_weight": 0.0, "distill.feature_loss": "mse", "distill.feature_layers": [],
    "distill.attention_weight": 0.0, "distill.teacher_cache": "", "distill.sequence_data": "",
    "distill.on_policy_fraction": 0.0,
    # Unused while the feature above is off: an older run matches whatever is set now.
    "distill.cache_estimator": None, "distill.on_policy_prompt_tokens": None,
    "distill.on_policy_new_tokens": None, "distill.on_policy_temperature": None,
    **{f"distill.{name}_schedule.{key}": value
       for name in ("alpha", "temperature", "feature_weight")
       for key, value in (("kind", "constant"), ("end", None), ("steps", 0))},
}
# Data fields added after runs were first saved, at the values those runs used (frozen likewise).
_DATA_DEFAULTS = {
    "data.train_files": "", "data.eval_files": "", "data.val_files": "",
    "data.eval_fraction": 0.05, "data.val_fraction": 0.05, "data.txt_unit": "line",
    "data.hf_dataset": "", "data.format": "", "data.messages_key": "messages",
    "data.train_on": "assistant", "data.chat_template": "",
    "data.mix_files": "", "data.mix_weight": 0.0, "data.split_digits": False,
}

PHASES = ("teacher", "distilled", "scratch")
# Fields that placement and numerics may change freely: the rest decide a model's math.
_FREE_MODEL_FIELDS = ("dtype", "param_dtype", "remat_policy", "scan_layers", "family", "quant",
                      "lora", *ATTENTION_KERNEL_FIELDS)


def preflight(config: Any, workdir: str, phases: tuple[str, ...] | None = None, *,
              teacher_only: bool = False) -> tuple[str, ...]:
  """Raises ConfigError on the first problem with `config` or the files it names.

  Args:
    config: the run's ConfigDict.
    workdir: the run's folder (its phases' checkpoints, or the teacher a script reads).
    phases: the phases that will run; None = those of config.mode (`phases_to_run`).
    teacher_only: for scripts that read the teacher to write its outputs (scripts/cache_teacher.py,
      scripts/teacher_sequences.py): the phases' own checkpoints and the distilled phase's teacher
      cache or sequence data, which such a script writes, are not checked.

  Returns:
    The phases.
  """
  config_check.check_config(config, jax.device_count(), jax.process_count())
  phases = phases_to_run(config) if phases is None else tuple(phases)
  if not teacher_only:
    check_resumable(config, workdir, phases)
  check_teacher_checkpoint(config, workdir, phases)
  if not teacher_only:
    check_teacher_sources(config, workdir, phases)
  return phases


def phases_to_run(config: Any) -> tuple[str, ...]:
  phases = {"experiment": PHASES, "eval": (), "teacher": ("teacher",),
            "distill": ("distilled",), "scratch": ("scratch",)}[config.mode]
  # A given teacher (a checkpoint or a Hugging Face model) replaces training one.
  given = ModelSources.from_config(config).teacher_given
  return tuple(p for p in phases if not (p == "teacher" and given))


def check_resumable(config: Any, workdir: str, phases: tuple[str, ...]) -> None:
  """Raises ConfigError if a phase would resume a run made with different math settings.

  In 'eval' mode nothing trains: config.student_quant may then differ from the run's, which
  evaluates its float params really quantized (PTQ), or a QAT student's unquantized."""
  current = json.loads(config.to_json())
  for phase in phases:
    directory = os.path.join(workdir, phase, "checkpoints")
    saved = checkpoint.saved_config(directory)
    if saved is not None:
      if config.mode == "eval" and "student_quant" in current:
        saved = dict(saved, student_quant=current["student_quant"])
      check_resume(saved, current, phase, os.path.join(workdir, phase))


def check_vocab(config: Any, tokenizer_size: int) -> None:
  """Every id the tokenizer gives must index both models (padding rows past it are fine)."""
  for name in ("teacher", "student"):
    if config[name].vocab_size < tokenizer_size:
      raise ConfigError(
          f"config.{name}.vocab_size: {config[name].vocab_size} is below the tokenizer's "
          f"{tokenizer_size} ids ({config.data.tokenizer_path or 'trained'}); teacher and "
          "student must share the tokenizer they were trained with.")


def _misfit(want: ModelConfig, have: ModelConfig) -> list[str]:
  return [f"{f.name}: {getattr(have, f.name)!r} -> {getattr(want, f.name)!r}"
          for f in dataclasses.fields(ModelConfig)
          if f.name not in _FREE_MODEL_FIELDS and getattr(want, f.name) != getattr(have, f.name)]


def _check_hf_model(config: Any, field: str, section: str) -> None:
  """config[field], a Hugging Face model directory, exists, fits config[section], and its
  safetensors hold exactly those params (checked from the files' headers: nothing is loaded)."""
  path = config[field]
  try:
    have = hf.model_config(path)
  except hf.HFError as e:
    raise ConfigError(
        f"config.{field}: {path} is not a readable Hugging Face model directory ({e}); point it "
        "at a folder with config.json and *.safetensors.") from None
  want = ModelConfig.from_dict(config[section])
  changed = _misfit(want, have)
  if changed:
    raise ConfigError(
        f"config.{section}: does not fit the model in {path} ({'; '.join(changed)}); set "
        f"config.{section} to kdjax.hf.model_config('{path}').")
  try:
    hf.check_checkpoint(path, dataclasses.replace(want, family=have.family))
  except hf.HFError as e:
    raise ConfigError(f"config.{field}: {e}") from None


def _load_tokenizer(field: str, path: str) -> hf_tokenizer.HFTokenizer:
  try:
    return hf_tokenizer.load(path)
  except (hf_tokenizer.UnreadableTokenizer, OSError) as e:
    raise ConfigError(
        f"config.{field}: cannot read the tokenizer in {path} ({e}); fix or replace its "
        "tokenizer files.") from None


def _check_tokenizers(config: Any) -> None:
  """The data's tokenizer, the teacher's and the student init's (those that exist) must give the
  same ids: equal vocabulary sizes alone would let a different tokenizer through. A given
  Hugging Face tokenizer must also fit both models (check_vocab)."""
  sources = ModelSources.from_config(config)
  places = (("data.tokenizer_path", config.data.tokenizer_path),
            ("teacher_hf", sources.teacher_hf), ("student_init", sources.student_init))
  found = [(f, p) for f, p in places if p and hf_tokenizer.has_tokenizer(p)]
  if not found:
    return
  first_field, reference = found[0][0], _load_tokenizer(*found[0])
  for field, path in found[1:]:
    difference = hf_tokenizer.difference(reference, _load_tokenizer(field, path))
    if difference:
      raise ConfigError(
          f"config.{field}: the tokenizer in {path} is not config.{first_field}'s "
          f"({difference}); teacher and student must share one tokenizer.")
  if first_field == "data.tokenizer_path":
    check_vocab(config, reference.vocab_size)


def check_teacher_checkpoint(config: Any, workdir: str, phases: tuple[str, ...]) -> None:
  """A teacher that distillation or evaluation will load must exist and fit config.teacher;
  so must a student_init."""
  sources = ModelSources.from_config(config)
  if sources.student_init and set(phases) & {"distilled", "scratch"}:
    _check_hf_model(config, "student_init", "student")
  _check_tokenizers(config)
  if sources.teacher_hf:
    if sources.teacher_checkpoint:
      raise ConfigError("config.teacher_hf: set either teacher_hf or teacher_checkpoint, not both.")
    _check_hf_model(config, "teacher_hf", "teacher")
    return
  if sources.teacher_checkpoint:
    directory = sources.teacher_checkpoint
  elif "teacher" not in phases and (set(phases) & {"distilled"} or config.mode == "eval"):
    directory = os.path.join(workdir, "teacher", "checkpoints")
  else:
    return  # this run trains the teacher itself
  field = "teacher_checkpoint" if sources.teacher_checkpoint else "mode"
  saved = checkpoint.saved_config(directory)
  if saved is None:
    raise ConfigError(
        f"config.{field}: no readable teacher checkpoint under {directory}; train the teacher "
        "first (mode=teacher or experiment) or point config.teacher_checkpoint at one.")
  changed = _misfit(ModelConfig.from_dict(config.teacher),
                    ModelConfig.from_dict(saved.get("teacher", {})))  # a saved run's JSON
  if changed:
    raise ConfigError(
        f"config.teacher: does not fit the teacher checkpoint in {directory} "
        f"({'; '.join(changed)}); set config.teacher to the checkpoint's model.")


def check_teacher_sources(config: Any, workdir: str, phases: tuple[str, ...]) -> None:
  """A teacher cache or sequence-level data that the distilled phase will read must exist and
  belong to this run."""
  if "distilled" not in phases:
    return
  sources = TeacherSources.from_config(config.distill)
  if sources.teacher_cache:
    try:
      teacher_cache.TeacherCache(sources.teacher_cache).check_config(config, workdir)
    except (FileNotFoundError, teacher_cache.CacheMismatch) as e:
      raise ConfigError(f"config.distill.teacher_cache: {e}") from None
  if sources.sequence_data:
    try:
      teacher_text.load_source(sources.sequence_data)
      record = teacher_text.read_metadata(sources.sequence_data)
    except FileNotFoundError as e:
      raise ConfigError(f"config.distill.sequence_data: {e}") from None
    made_by = ((record.get("metadata") or {}).get("teacher") or {}).get("hash")  # optional
    if made_by != teacher_cache.teacher_fingerprint(config, workdir)["hash"]:
      raise ConfigError(
          f"config.distill.sequence_data: {sources.sequence_data} was generated by another "
          "teacher (or one with other settings) than this run's; regenerate it with "
          "scripts/teacher_sequences.py for this config, or point at the right folder.")


def _alters(key: str, fields: tuple[str, ...]) -> bool:
  return any(key == f or key.startswith(f + ".") for f in fields)


def check_resume(saved: dict, current: dict, phase: str, directory: str) -> None:
  """Refuses to resume `phase` from `directory` if a field that alters its math changed."""
  old, new = config_check.flatten(saved), config_check.flatten(current)
  for section in ("teacher", "student"):  # runs saved before a model field existed had its default
    if section in saved:
      for f in dataclasses.fields(ModelConfig):
        if f.name not in ("quant", "lora"):  # sections of their own (student_quant, _lora)
          old.setdefault(f"{section}.{f.name}", f.default)
  for key in ("teacher_hf", "student_init"):
    old.setdefault(key, "")
  for name, cls in (("student_quant", QuantConfig), ("student_lora", LoraConfig)):
    for f in dataclasses.fields(cls):  # runs saved before these sections existed: both off
      old.setdefault(f"{name}.{f.name}", f.default)
  if "data" in saved:
    for key, value in _DATA_DEFAULTS.items():
      old.setdefault(key, value)
  for section in ("teacher_train", "student_train"):  # before the chunked cross-entropy
    if section in saved:
      old.setdefault(f"{section}.loss_chunk_size", 0)
  if "distill" in saved:
    for key, value in _DISTILL_DEFAULTS.items():
      # A constant schedule ignores its end: an older run matches whatever end is set now.
      old.setdefault(key, new.get(key) if value is None else value)
  kernels = {f"{section}.{field}" for section in ("teacher", "student")
             for field in ATTENTION_KERNEL_FIELDS}
  changed = []
  for key in sorted(set(old) | set(new)):
    if _alters(key, PHASE_FIELDS[phase]) and key not in _NON_MATH_DATA | kernels:
      if old.get(key) != new.get(key):
        changed.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
  if changed:
    raise ConfigError(
        f"config: {directory} holds a '{phase}' run made with different settings "
        f"({'; '.join(changed)}); use a new --workdir (config.teacher_checkpoint can reuse a "
        "teacher) or restore those values.")
