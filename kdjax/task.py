"""Task distillation: the teacher answers your prompts, the student learns its answers and logits,
and the table shows how much of the teacher's task accuracy each student keeps and how much
faster and smaller it is.

A config with a `task` section (settings.TaskSettings; configs/word_problems.py) runs, each
phase in `<workdir>/<phase>/` and resumable like the default experiment:

  teacher   trained on task.teacher_files (answer-only loss), unless a teacher is given
  answers   the teacher answers task.prompt_files (greedy) and records its top-k log-probs at
            every answer token (kdjax.answer_files: <workdir>/answers/)
  labelled  the student on task.labelled_files only: no teacher
  seq       the student on the teacher's answers: cross-entropy (sequence-level)
  logits    the same answers with the teacher's recorded logits: alpha * soft + (1 - alpha) * CE,
            the soft loss from config.distill (cache_estimator over the recorded top-k); no
            teacher runs in the step
  mixed     `logits` with the labelled records mixed in at task.mix_weight (ground truth, which
            has no teacher distribution: cross-entropy only on those)

Every student has the same init seed, steps and batch size. Then each model answers
task.test_files greedily (KV cache); kdjax.task_eval scores exact match, agreement with the
teacher and, where the teacher is wrong, how often the student repeats its wrong answer. Decode
speed comes from kdjax.decode_speed. `summary.json` (deterministic) and `speed.json` (timings)
are written to the workdir and the table is printed. config.mode 'eval' scores the checkpoints
in the workdir again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from typing import Any

import jax
import numpy as np

from kdjax import (answer_files, answers, config_check, decode_speed, evaluate, experiment,
                   inputs, loop, preflight as run_checks, quantize, settings, sharding,
                   task_eval)
from kdjax.config_check import ConfigError
from kdjax.data import (answer_logits, chat_template, encoding, hosts, pipeline, records,
                        sources, word_problems)
from kdjax.model import ModelConfig
from kdjax.report import write_json, write_text
from kdjax.settings import (DataSettings, DistillSettings, ModelSources, TaskSettings,
                            TrainSettings)

STUDENTS = ("labelled", "seq", "logits", "mixed")
LABELS = {"teacher": "teacher", "labelled": "labelled only (no teacher)",
          "seq": "teacher's answers", "logits": "answers + logits",
          "mixed": "answers + logits + labelled"}
_FILES = ("teacher_files", "labelled_files", "prompt_files", "val_files", "test_files")


@dataclasses.dataclass
class TaskData:
  settings: TaskSettings
  files: dict[str, str]  # task.<name>_files -> the files (generated ones filled in)
  records: dict[str, Any]  # teacher, labelled, val, test: checked records
  prompts: list[answers.Prompt]  # what the teacher answers
  test: list[answers.Prompt]  # what every model answers, with references
  tokenizer: Any
  encoder: encoding.Encoder
  val_batches: list[dict[str, np.ndarray]]


def _generated_files(config: Any, t: TaskSettings) -> dict[str, str]:
  if t.generate != "word_problems":
    raise ConfigError(f"config.task.generate: unknown {t.generate!r}; use 'word_problems' or ''.")
  spec = config.task_data.to_dict()
  directory = os.path.join(inputs.data_dir(config), "word_problems")
  paths = word_problems.write_splits(directory, spec["sizes"], int(spec["seed"]),
                                     **spec["ranges"])
  prompts = os.path.join(directory, "prompts_unlabelled.jsonl")
  # The user's unlabelled prompts: the generator's prompts without their answers.
  word_problems.write_jsonl([{"prompt": r["prompt"]} for r in _read(paths["prompts"])], prompts)
  return {"teacher_files": paths["teacher"], "labelled_files": paths["labelled"],
          "prompt_files": prompts, "val_files": paths["val"], "test_files": paths["test"]}


def _read(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _tokenizer(config: Any, d: DataSettings, teacher_records, given_teacher: bool):
  if given_teacher and not d.tokenizer_path:
    raise ConfigError("config.data.tokenizer_path: a given teacher needs its own tokenizer; "
                      "point it at the teacher's tokenizer.")
  key = hashlib.sha256(json.dumps(sorted(config.task.to_dict().items()),
                                  default=str).encode()).hexdigest()[:12]
  return inputs.load_tokenizer(d, inputs.data_dir(config), teacher_records, f"task-{key}",
                               lambda r: records.text_of(r))


def preflight(config: Any, workdir: str) -> None:
  """The config's values, the task section's, and that no phase resumes other settings."""
  config_check.check_config(config, jax.device_count(), jax.process_count())
  t = TaskSettings.from_config(config.task)
  for field, bad, why in (
      ("max_new_tokens", t.max_new_tokens < 1, "must be >= 1"),
      ("answer_batch_size", t.answer_batch_size < 1, "must be >= 1"),
      ("record_topk", not 1 <= t.record_topk <= int(config.teacher.vocab_size),
       "must be in [1, teacher.vocab_size] (the logits students learn from it)"),
      ("mix_weight", not 0 < t.mix_weight < 1, "must be in (0, 1)"),
      ("speed_batch_sizes", not t.speed_batch_sizes or min(t.speed_batch_sizes) < 1,
       "must be batch sizes >= 1"),
      ("speed_runs", t.speed_runs < 1, "must be >= 1")):
    if bad:
      raise ConfigError(f"config.task.{field}: {why}, got {getattr(t, field)!r}.")
  if config.distill.cache_estimator not in ("topk_renorm", "topk_residual"):
    raise ConfigError(f"config.distill.cache_estimator: {config.distill.cache_estimator!r} "
                      "cannot read recorded answers (top-k only); use 'topk_residual' or "
                      "'topk_renorm'.")
  run_checks.check_resumable(config, workdir, ("teacher",) + STUDENTS)


def prepare(config: Any) -> TaskData:
  """Every file read and checked, the tokenizer trained or loaded, the prompts encoded and the
  answer extractor tried on the references: all before any compile work or workdir."""
  t, d = TaskSettings.from_config(config.task), DataSettings.from_config(config.data)
  if t.extractor not in task_eval.EXTRACTORS:
    raise ConfigError(f"config.task.extractor: unknown {t.extractor!r}; use one of "
                      f"{task_eval.EXTRACTORS}.")
  files = _generated_files(config, t) if t.generate else {f: getattr(t, f) for f in _FILES}
  given = ModelSources.from_config(config).teacher_given
  needed = [f for f in _FILES if f != "teacher_files" or not given]
  if missing := [f for f in needed if not files[f]]:
    raise ConfigError(f"config.task.{missing[0]}: empty; give a glob of records (or set "
                      "task.generate='word_problems').")
  raw = {f[:-6]: sources.read_files(files[f], f"task.{f}") for f in needed}
  fmt = records.detect(raw["labelled"][0], d.text_key, d.messages_key)
  check = lambda r: records.checked(r, fmt, d.text_key, d.messages_key, d.train_on)
  checked = {name: [check(rs[i]) for i in range(len(rs))] for name, rs in raw.items()
             if name != "prompt"}
  tok = _tokenizer(config, d, checked.get("teacher") or checked["labelled"], given)
  run_checks.check_vocab(config, tok.vocab_size)
  chat = None if fmt == "prompt_completion" and isinstance(checked["labelled"][0]["prompt"],
                                                           str) else chat_template.load(
      tok, d.tokenizer_path, d.chat_template)
  encoder = encoding.Encoder(fmt, tok, chat, train_on=d.train_on, text_key=d.text_key,
                             messages_key=d.messages_key)
  max_len = min(int(config.teacher.max_len), int(config.student.max_len))
  read = lambda name: answers.read_prompts(raw[name], encoder, max_len=max_len,
                                           max_new_tokens=t.max_new_tokens,
                                           name=f"task.{name}_files")
  test = read("test")
  task_eval.check_extractor([p.reference or "" for p in test], t.extractor, t.marker,
                            f"task.test_files ({files['test_files']})")
  val_batches = pipeline.eval_batches(raw["val"], tok, seq_len=d.seq_len,
                                      batch_size=d.eval_batch_size, max_batches=d.val_batches,
                                      encode=encoder)
  return TaskData(t, files, raw, read("prompt"), test, tok, encoder, val_batches)


def _stream(config: Any, source, encoder: encoding.Encoder, seed: int):
  d = DataSettings.from_config(config.data)
  return hosts.HostBatches(
      lambda s: pipeline.train_iterator(source, encoder.tokenizer, seq_len=d.seq_len,
                                        batch_size=d.batch_size // d.num_shards, seed=seed,
                                        shard_index=s, shard_count=d.num_shards,
                                        encode=encoder), d.num_shards)


def _spec(config: Any, workdir: str, phase: str, cfg: ModelConfig, train: Any, seed: int,
          make_iter, data: TaskData, mesh, rules, **extra) -> loop.PhaseSpec:
  placement = evaluate.Placement(mesh, rules)
  d = config.data
  return loop.PhaseSpec(
      phase=phase, phase_dir=os.path.join(workdir, phase), model_cfg=cfg,
      train_cfg=TrainSettings.from_config(train), seed=seed, mesh=mesh, rules=rules,
      make_train_iter=make_iter, tokens_per_step=int(d.batch_size) * int(d.seq_len),
      val_loss_fn=lambda p: evaluate.held_out_loss(cfg, p, data.val_batches, placement,
                                                   DataSettings.from_config(d).eval_chunk_size),
      **experiment.phase_kwargs(config), **extra)


def _student(config: Any, workdir: str, phase: str, data: TaskData, mesh, rules):
  """Trains (or resumes) one of STUDENTS; returns its params."""
  t = data.settings
  answers_path = os.path.join(workdir, "answers", answer_files.ANSWERS)
  if phase == "labelled":
    source, encoder, distill = data.records["labelled"], data.encoder, None
  else:
    source = sources.read_files(answers_path, "answers")
    encoder, distill = data.encoder, None
    if phase in ("logits", "mixed"):
      store = answer_logits.AnswerLogits(os.path.join(workdir, "answers"))
      encoder = _with_logits(data.encoder, store)
      distill = dataclasses.replace(DistillSettings.from_config(config.distill),
                                    cache_estimator=config.distill.cache_estimator,
                                    cache_vocab_size=store.vocab_size)
    if phase == "mixed":
      source = sources.Mixed(source, data.records["labelled"], t.mix_weight)
  s_cfg = settings.student_model(config)
  spec = _spec(config, workdir, phase, s_cfg, config.student_train, config.seed + 1,
               lambda: _stream(config, source, encoder, config.seed + 1), data, mesh, rules,
               distill=distill)
  return loop.train_phase(spec).params


def _with_logits(encoder: encoding.Encoder, store) -> encoding.Encoder:
  return encoding.Encoder(encoder.fmt, encoder.tokenizer, encoder.chat, train_on=encoder.train_on,
                          text_key=encoder.text_key, messages_key=encoder.messages_key,
                          answer_logits=store)


def _teacher_model(config: Any, workdir: str, data: TaskData, mesh, rules) -> answers.Model:
  teacher = experiment.load_teacher(config, workdir, mesh, rules)
  hf_dir = ModelSources.from_config(config).teacher_hf
  stops = answers.stop_ids(data.tokenizer, answers.hf_stop_ids(hf_dir) if hf_dir else ())
  return answers.Model(teacher.cfg, teacher.params, data.encoder, stops, mesh)


def _answer_prompts(config: Any, workdir: str, data: TaskData, model: answers.Model) -> None:
  t = data.settings
  sampling = answers.Sampling(max_new_tokens=t.max_new_tokens, seed=int(config.seed))
  manifest = answer_files.write(
      model, data.prompts, sampling, os.path.join(workdir, "answers"),
      batch_size=t.answer_batch_size, record_topk=t.record_topk,
      teacher={"checkpoint": "<workdir>/teacher"}, progress=bool(config.progress_bar))
  print(f"answers: {manifest['answers']} answers to {manifest['prompts']} prompts "
        f"({manifest['finished']} ended on a stop token), {manifest['new_tokens']} new tokens",
        file=sys.stderr)


def _score_all(config: Any, workdir: str, data: TaskData, models: dict[str, answers.Model]):
  """summary (deterministic) and speed, per model; the teacher first."""
  t = data.settings
  greedy = answers.Sampling(max_new_tokens=t.max_new_tokens, seed=int(config.seed))
  refs = [p.reference for p in data.test]
  summary, texts, speed = {}, {}, {}
  for name, model in models.items():
    got = answers.answer_all(model, data.test, greedy, batch_size=t.answer_batch_size)
    texts[name] = [a.text for a in got]
    scores = task_eval.score(texts[name], refs, extractor=t.extractor, marker=t.marker,
                             teacher_predictions=None if name == "teacher" else texts["teacher"])
    params = sum(x.size for x in jax.tree.leaves(model.params))
    served = evaluate.evaluated_model(model.cfg, model.params)[1]
    summary[name] = {**scores, "params": int(params),
                     "weight_bytes": quantize.weight_bytes(served),
                     "accuracy_kept": scores["exact_match"] / max(
                         summary.get("teacher", scores)["exact_match"], 1e-9)}
    arch = "teacher" if name == "teacher" else "student"  # the students share one shape
    if arch not in speed:
      speed[arch] = decode_speed.decode_speed(
          model.cfg, model.params, batch_sizes=t.speed_batch_sizes,
          prompt_tokens=max(len(p.ids) for p in data.test), max_new_tokens=t.max_new_tokens,
          runs=t.speed_runs)
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, "predictions"), exist_ok=True)
    for name, preds in texts.items():
      write_text(os.path.join(workdir, "predictions", f"{name}.jsonl"), "".join(
          json.dumps({"prompt": p.prompt, "reference": p.reference, "answer": a},
                     ensure_ascii=False) + "\n" for p, a in zip(data.test, preds)))
    write_json(os.path.join(workdir, "summary.json"), summary)
    write_json(os.path.join(workdir, "speed.json"), speed)
  print(format_table(summary, speed))
  return summary, speed


def _throughput(speed: dict, arch: str) -> float:
  rows = speed[arch]
  return rows[str(max(int(b) for b in rows))]["new_tokens_per_s"]


def format_table(summary: dict[str, dict], speed: dict) -> str:
  """One line per model: task accuracy, what it keeps of the teacher's, and its cost."""
  t_params, t_speed = summary["teacher"]["params"], _throughput(speed, "teacher")
  lines = [f"{'model':<28} {'params':>9} {'exact':>6} {'kept':>6} {'agree':>6} "
           f"{'copies':>6} {'smaller':>7} {'faster':>6}"]
  for name, m in summary.items():
    arch = "teacher" if name == "teacher" else "student"
    agree = m.get("teacher_agreement", 1.0)
    copies = m.get("error_copying", float("nan"))  # NaN: the teacher is never wrong, or teacher
    copies = "-" if copies != copies else f"{copies:.1%}"
    lines.append(f"{LABELS.get(name, name):<28} {m['params']:>9,d} {m['exact_match']:>6.1%} "
                 f"{m['accuracy_kept']:>6.1%} {agree:>6.1%} {copies:>6} "
                 f"{t_params / m['params']:>6.1f}x {_throughput(speed, arch) / t_speed:>5.1f}x")
  return "\n".join(lines)


def run(config: Any, workdir: str, data: TaskData | None = None) -> dict[str, Any]:
  """Runs config.mode ('experiment' or 'eval') of a task config; returns the summary."""
  if config.mode not in ("experiment", "eval"):
    raise ConfigError(f"config.mode: a task config runs 'experiment' or 'eval', not "
                      f"{config.mode!r}.")
  if jax.process_count() > 1:
    raise ConfigError("config.task: the task experiment runs on one process; answer prompts "
                      "across hosts with scripts/teacher_answers.py and train from its output.")
  data = data or prepare(config)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_from_config(config)
  os.makedirs(workdir, exist_ok=True)
  given = ModelSources.from_config(config).teacher_given
  if config.mode == "experiment" and not given:
    t_cfg = ModelConfig.from_dict(config.teacher)
    loop.train_phase(_spec(config, workdir, "teacher", t_cfg, config.teacher_train, config.seed,
                           lambda: _stream(config, data.records["teacher"], data.encoder,
                                           config.seed), data, mesh, rules))
  teacher = _teacher_model(config, workdir, data, mesh, rules)
  if config.mode == "experiment":
    _answer_prompts(config, workdir, data, teacher)
    students = {p: _student(config, workdir, p, data, mesh, rules) for p in STUDENTS}
  else:
    students = {p: experiment.load_student(config, os.path.join(workdir, p, "checkpoints"),
                                           mesh, rules)
                for p in STUDENTS if os.path.isdir(os.path.join(workdir, p, "checkpoints"))}
  s_cfg = settings.student_model(config)
  models = {"teacher": teacher, **{p: answers.Model(s_cfg, params, data.encoder,
                                                    teacher.stop_ids, mesh)
                                   for p, params in students.items()}}
  return _score_all(config, workdir, data, models)[0]
