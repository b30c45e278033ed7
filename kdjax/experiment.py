"""The default experiment: teacher -> distilled student -> scratch student -> held-out table.

This module wires the phases and runs them; kdjax.preflight checks the config and its files
before any of that, kdjax.inputs prepares the data, and kdjax.report prints and writes the table.

Each phase lives in `<workdir>/<phase>/` (metrics.jsonl, tensorboard/, checkpoints/) and resumes
from its latest checkpoint, so rerunning the command continues a killed run and skips finished
phases. The distilled and scratch students share their init seed and their data order: the only
difference between them is the teacher's signal.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import jax

from kdjax import (checkpoint, evaluate, hf, lora, loop, preflight, sample, settings, sharding,
                   teacher_cache)
from kdjax.data import teacher_text
from kdjax.inputs import Data, prepare_data
from kdjax.model import ModelConfig
from kdjax.preflight import PHASES
from kdjax.report import write_summary
from kdjax.settings import (DistillSettings, FrozenTeacher, ModelSources,
                            TeacherSources, TrainSettings)
from kdjax.state import abstract_params, lora_seed_base, param_shardings, trained_params_like


def phase_kwargs(config: Any) -> dict:
  return dict(log_every=config.log_every, checkpoint_every=config.checkpoint_every,
              keep_checkpoints=config.keep_checkpoints, show_progress=config.progress_bar,
              nonfinite_patience=config.nonfinite_patience,
              config_dict=json.loads(config.to_json()))


def load_params(cfg: ModelConfig, directory: str, mesh, rules):
  """(params, shardings) of the latest checkpoint under `directory`, read-only.

  Params are restored straight into their shardings (each device reads its own slice) and in
  `cfg.param_dtype`, cast on read if the checkpoint holds another dtype.
  """
  shardings = param_shardings(cfg, mesh, rules)
  like = abstract_params(cfg)
  params, _ = checkpoint.load_params(directory, like, shardings)
  return params, shardings


def load_student(config: Any, directory: str, mesh, rules, step: int | None = None) -> Any:
  """A student phase's trained params from its checkpoints (the latest, or `step`), read-only;
  a LoRA student's adapters come with its frozen base (config.student_init, or the seed's)."""
  s_cfg = settings.student_model(config)
  like, shardings = trained_params_like(s_cfg, mesh, rules)
  params, _ = checkpoint.load_params(directory, like, shardings, step)
  if not s_cfg.lora.rank:
    return params
  init = ModelSources.from_config(config).student_init
  base = (hf.load_params(init, s_cfg, mesh, rules) if init
          else lora_seed_base(s_cfg, config.seed + 1, mesh, rules))
  return lora.combine(base, params)


def frozen_teacher_settings(config: Any, rules) -> tuple[ModelConfig, sharding.Rules]:
  """The teacher as distillation runs it: `config.frozen_teacher` may store its params in
  another dtype (bf16 halves their memory), compute in another dtype and shard them by their own
  rules (say, FSDP over every device); its shapes are always `config.teacher`'s."""
  t_cfg = ModelConfig.from_dict(config.teacher)
  frozen = FrozenTeacher.from_config(config)
  t_cfg = dataclasses.replace(t_cfg, dtype=frozen.dtype or t_cfg.dtype,
                              param_dtype=frozen.param_dtype or t_cfg.param_dtype)
  return t_cfg, sharding.parse_rules(frozen.sharding_rules) or rules


def load_teacher(config: Any, workdir: str, mesh, rules) -> loop.Teacher:
  t_cfg, t_rules = frozen_teacher_settings(config, rules)
  sources = ModelSources.from_config(config)
  if sources.teacher_hf:  # read-only, straight into the frozen teacher's shardings
    return loop.Teacher(t_cfg, hf.load_params(sources.teacher_hf, t_cfg, mesh, t_rules),
                        param_shardings(t_cfg, mesh, t_rules), rules=t_rules)
  directory = sources.teacher_checkpoint or os.path.join(workdir, "teacher", "checkpoints")
  return loop.Teacher(t_cfg, *load_params(t_cfg, directory, mesh, t_rules), rules=t_rules)


def run_experiment_phase(config: Any, workdir: str, phase: str, data: Data, mesh,
                         rules) -> loop.PhaseResult:
  """Runs one of PHASES; 'distilled' loads the teacher from its checkpoint (read-only)."""
  common = dict(phase=phase, phase_dir=os.path.join(workdir, phase), mesh=mesh, rules=rules,
                tokens_per_step=data.tokens_per_step, **phase_kwargs(config))
  placement = evaluate.Placement(mesh, rules)
  chunk = settings.DataSettings.from_config(config.data).eval_chunk_size
  if phase == "teacher":
    t_cfg = ModelConfig.from_dict(config.teacher)
    return _train(model_cfg=t_cfg,
                  val_loss_fn=lambda p: evaluate.held_out_loss(t_cfg, p, data.val_batches,
                                                               placement, chunk),
                  train_cfg=TrainSettings.from_config(config.teacher_train), seed=config.seed,
                  make_train_iter=lambda: data.make_train_iter(config.seed), **common)
  # Both students: the same init seed and the same batches.
  s_cfg = settings.student_model(config)
  init = ModelSources.from_config(config).student_init
  student = dict(model_cfg=s_cfg, train_cfg=TrainSettings.from_config(config.student_train),
                 seed=config.seed + 1,
                 init_params=(lambda: hf.load_params(init, s_cfg, mesh, rules)) if init else None,
                 make_train_iter=lambda: data.make_train_iter(config.seed + 1),
                 val_loss_fn=lambda p: evaluate.held_out_loss(s_cfg, p, data.val_batches,
                                                              placement, chunk))
  if phase == "distilled":
    return _run_distilled(config, workdir, data, student, common)
  return _train(**student, **common)


def _train(**spec) -> loop.PhaseResult:
  return loop.train_phase(loop.PhaseSpec(**spec))


def _run_distilled(config: Any, workdir: str, data: Data, student: dict, common: dict):
  """The distilled student, from the live teacher, its cache, or its continuations."""
  mesh, rules = common["mesh"], common["rules"]
  settings = DistillSettings.from_config(config.distill)
  sources = TeacherSources.from_config(config.distill)
  if settings.on_policy is not None:  # the student samples real tokenizer ids only
    tok = data.tokenizer
    shared = min(tok.vocab_size, int(config.teacher.vocab_size), int(config.student.vocab_size))
    settings = dataclasses.replace(settings, on_policy=dataclasses.replace(
        settings.on_policy, vocab_size=shared,
        eos_id=-1 if tok.eos_id is None else int(tok.eos_id)))
  if sources.sequence_data:  # sequence-level: the teacher's text replaces the train split
    source = teacher_text.load_source(sources.sequence_data)
    student["make_train_iter"] = lambda: data.make_stream(source, config.seed + 1)
  if settings.cache_estimator:  # the teacher's log-probs come with each batch; no teacher runs
    cache = teacher_cache.TeacherCache(sources.teacher_cache)
    stream = student["make_train_iter"]
    student["make_train_iter"] = lambda: teacher_cache.CachedBatches(stream(), cache)
    return _train(distill=dataclasses.replace(settings, cache_vocab_size=cache.vocab_size),
                  **student, **common)
  if not settings.uses_teacher:  # e.g. sequence-level with alpha = 0: cross-entropy alone
    return _train(**student, **common)
  return _train(teacher=load_teacher(config, workdir, mesh, rules), distill=settings,
                **student, **common)


def samples(config: Any, cfg: ModelConfig, params: Any, tok, mesh) -> list[str]:
  return sample.generate_texts(
      cfg, params, tok, config.sample_prompts[:config.num_samples],
      max_new_tokens=config.sample_tokens, temperature=config.sample_temperature,
      top_k=config.sample_top_k, rng=jax.random.key(config.seed), mesh=mesh)


def evaluate_phases(config: Any, workdir: str, data: Data, teacher: loop.Teacher,
                    params: dict[str, Any], mesh, rules) -> dict[str, dict[str, float]]:
  """Held-out metrics of every model against the teacher; process 0 writes summary.json
  atomically (every process computes it: evaluation is one data-parallel program)."""
  s_cfg = settings.student_model(config)
  summary, texts = {}, {}
  for phase, p in params.items():
    cfg, model_rules = (teacher.cfg, teacher.rules) if phase == "teacher" else (s_cfg, rules)
    placement = evaluate.Placement(mesh, model_rules, teacher.rules)
    metrics = evaluate.evaluate(cfg, p, teacher.cfg, teacher.params, data.eval_batches, placement,
                                settings.DataSettings.from_config(config.data).eval_chunk_size)
    metrics["params"] = sum(x.size for x in jax.tree.leaves(lora.merged(cfg, p)))
    summary[phase] = metrics
    texts[phase] = samples(config, cfg, p, data.tokenizer, mesh)
  if jax.process_index() == 0:
    write_summary(workdir, summary, texts)
  return summary


def run(config: Any, workdir: str, phases: tuple[str, ...] | None = None,
        data: Data | None = None) -> dict[str, Any] | None:
  """Runs `config.mode` in `workdir`; returns the summary for 'experiment' and 'eval'.

  `phases` is what preflight.preflight returned and `data` what inputs.prepare_data did, for a
  caller that ran them already (the CLI); None runs them here, before any compile work.
  """
  if phases is None:
    phases = preflight.preflight(config, workdir)
  data = data or prepare_data(config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config)
  os.makedirs(workdir, exist_ok=True)
  params = {}
  for phase in phases:
    result = run_experiment_phase(config, workdir, phase, data, mesh, rules)
    if result.trained_steps == 0:
      print(f"{phase}: already complete at step {result.final_step} in {workdir}, skipped",
            file=sys.stderr)
    if phase != "teacher":  # the teacher is reloaded as configured in frozen_teacher; free it
      params[phase] = result.params
  if config.mode not in ("experiment", "eval"):
    return None
  teacher = load_teacher(config, workdir, mesh, rules)
  found = [p for p in PHASES[1:]
           if p in params or checkpoint.saved_config(os.path.join(workdir, p, "checkpoints"))]
  if missing := [p for p in PHASES[1:] if p not in found]:  # e.g. a workdir of one method
    print(f"eval: no {' or '.join(missing)} checkpoints in {workdir}; evaluating the others",
          file=sys.stderr)
  params = {"teacher": teacher.params,
            **{p: params[p] if p in params else _load_phase_params(config, workdir, p, mesh, rules)
               for p in found}}
  return evaluate_phases(config, workdir, data, teacher, params, mesh, rules)


def _load_phase_params(config, workdir, phase, mesh, rules):
  directory = os.path.join(workdir, phase, "checkpoints")
  if phase == "teacher":
    return load_params(ModelConfig.from_dict(config.teacher), directory, mesh, rules)[0]
  return load_student(config, directory, mesh, rules)
