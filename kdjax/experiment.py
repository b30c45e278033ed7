"""The default experiment: teacher -> distilled student -> scratch student -> held-out table.

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
from typing import Any, Callable, Iterator

import jax
import numpy as np

from kdjax import checkpoint, config_check, evaluate, hf, loop, sample, sharding, teacher_cache
from kdjax.data import hf_tokenizer, hosts, pipeline, shakespeare, teacher_text
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.model import ModelConfig
from kdjax.settings import DistillSettings
from kdjax.state import abstract_params, param_shardings

PHASES = ("teacher", "distilled", "scratch")


@dataclasses.dataclass
class Data:
  tokenizer: tokenizer_lib.TextTokenizer
  make_train_iter: Callable[[int], Iterator]  # seed -> endless batches with get/set_state
  eval_batches: list[dict[str, np.ndarray]]
  val_batches: list[dict[str, np.ndarray]]  # held-out batches that choose the best checkpoint
  tokens_per_step: int
  # (source, seed) -> the same kind of stream over another source of {'text'} examples (the
  # teacher's continuations of sequence-level distillation).
  make_stream: Callable[[Any, int], Iterator] | None = None


def data_dir(config: Any) -> str:
  return os.path.expanduser(config.data.data_dir or os.environ.get(
      "TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets")))


def prepare_data(config: Any) -> Data:
  """Builds the dataset and tokenizer once (both cached under the data dir)."""
  d, root = config.data, data_dir(config)
  if d.name == "shakespeare":
    shakespeare.build_shakespeare(root, archive=d.archive or None)
  train_source = _split(d, "train_split", root)
  eval_source = _split(d, "eval_split", root)
  tok = _tokenizer(d, root, train_source)
  check_vocab(config, tok.vocab_size)
  num_shards = int(d.get("num_shards", 1))

  def make_stream(source, seed: int):
    # This process's streams (see data/hosts.py): the global batch is the same on any number
    # of processes, and each process tokenizes only its rows.
    return hosts.HostBatches(
        lambda s: pipeline.train_iterator(source, tok, seq_len=d.seq_len,
                                          batch_size=d.batch_size // num_shards, seed=seed,
                                          shard_index=s, shard_count=num_shards), num_shards)

  make_train_iter = lambda seed: make_stream(train_source, seed)

  evals = pipeline.eval_batches(eval_source, tok, seq_len=d.seq_len,
                                batch_size=d.eval_batch_size, max_batches=d.eval_batches)
  vals = pipeline.eval_batches(_split(d, "val_split", root), tok, seq_len=d.seq_len,
                               batch_size=d.eval_batch_size, max_batches=d.val_batches)
  return Data(tok, make_train_iter, evals, vals, d.batch_size * d.seq_len, make_stream)


def check_vocab(config: Any, tokenizer_size: int) -> None:
  """Every id the tokenizer gives must index both models (padding rows past it are fine)."""
  for name in ("teacher", "student"):
    if config[name].vocab_size < tokenizer_size:
      raise config_check.ConfigError(
          f"config.{name}.vocab_size: {config[name].vocab_size} is below the tokenizer's "
          f"{tokenizer_size} ids ({config.data.tokenizer_path or 'trained'}); teacher and "
          "student must share the tokenizer they were trained with.")


def _split(d: Any, field: str, root: str):
  """The examples of split `d[field]`; an unknown or empty split names the field."""
  try:
    source = pipeline.load_source(d.name, d[field], root, text_key=d.text_key)
  except (KeyError, ValueError) as e:  # TFDS: unknown split, or an empty slice such as 'x[:0]'
    raise config_check.ConfigError(
        f"config.data.{field}: cannot load split {d[field]!r} of {d.name!r} "
        f"({' '.join(str(e).split())[:150]}); choose an existing, non-empty split.") from None
  if len(source) == 0:
    raise config_check.ConfigError(
        f"config.data.{field}: split {d[field]!r} of {d.name!r} has no examples; choose a "
        "non-empty split.")
  return source


def _tokenizer(d: Any, root: str, train_source) -> tokenizer_lib.TextTokenizer:
  """The given tokenizer file, or the cached one trained on the train split (trained if absent)."""
  if d.tokenizer_path and not os.path.exists(d.tokenizer_path):
    raise config_check.ConfigError(
        f"config.data.tokenizer_path: {d.tokenizer_path} does not exist; point it at a "
        "Hugging Face model directory, a tokenizer.json, a SentencePiece .model file, or set it "
        "to '' to train one on the train split.")
  path = d.tokenizer_path or os.path.join(root, "tokenizers", f"{d.name}_bpe{d.vocab_size}.model")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  try:
    return tokenizer_lib.train_or_load(
        pipeline.texts(train_source, d.tokenizer_max_documents or None), path, d.vocab_size)
  except (RuntimeError, hf_tokenizer.UnreadableTokenizer) as e:  # not a tokenizer file
    raise config_check.ConfigError(
        f"config.data.tokenizer_path: {path} is not a readable tokenizer "
        f"({' '.join(str(e).split())[:120]}); replace it, or delete it to retrain.") from None


# Fields that placement and numerics may change freely: the rest decide a model's math.
_FREE_MODEL_FIELDS = ("dtype", "param_dtype", "remat_policy", "scan_layers", "family")


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
    raise config_check.ConfigError(
        f"config.{field}: {path} is not a readable Hugging Face model directory ({e}); point it "
        "at a folder with config.json and *.safetensors.") from None
  want = ModelConfig.from_dict(config[section])
  changed = _misfit(want, have)
  if changed:
    raise config_check.ConfigError(
        f"config.{section}: does not fit the model in {path} ({'; '.join(changed)}); set "
        f"config.{section} to kdjax.hf.model_config('{path}').")
  try:
    hf.check_checkpoint(path, dataclasses.replace(want, family=have.family))
  except hf.HFError as e:
    raise config_check.ConfigError(f"config.{field}: {e}") from None


def _check_shared_tokenizer(config: Any) -> None:
  """The data's tokenizer, the teacher's and the student init's (those that exist) must give the
  same ids: equal vocabulary sizes alone would let a different tokenizer through."""
  places = [(f, config.data.tokenizer_path if f == "data.tokenizer_path" else config.get(f))
            for f in ("data.tokenizer_path", "teacher_hf", "student_init")]
  found = [(f, p) for f, p in places if p and hf_tokenizer.has_tokenizer(p)]
  if len(found) < 2:
    return
  def load(field, path):
    try:
      return hf_tokenizer.load(path)
    except (hf_tokenizer.UnreadableTokenizer, OSError) as e:
      raise config_check.ConfigError(
          f"config.{field}: cannot read the tokenizer in {path} ({e}); fix or replace its "
          "tokenizer files.") from None

  first_field, reference = found[0][0], load(*found[0])
  for field, path in found[1:]:
    difference = hf_tokenizer.difference(reference, load(field, path))
    if difference:
      raise config_check.ConfigError(
          f"config.{field}: the tokenizer in {path} is not config.{first_field}'s ({difference}); "
          "teacher and student must share one tokenizer.")


def check_teacher_checkpoint(config: Any, workdir: str, phases: tuple[str, ...]) -> None:
  """A teacher that distillation or evaluation will load must exist and fit config.teacher;
  so must a student_init."""
  if config.get("student_init") and set(phases) & {"distilled", "scratch"}:
    _check_hf_model(config, "student_init", "student")
  _check_shared_tokenizer(config)
  if config.get("teacher_hf"):
    if config.teacher_checkpoint:
      raise config_check.ConfigError(
          "config.teacher_hf: set either teacher_hf or teacher_checkpoint, not both.")
    _check_hf_model(config, "teacher_hf", "teacher")
    return
  if config.teacher_checkpoint:
    directory = config.teacher_checkpoint
  elif "teacher" not in phases and (set(phases) & {"distilled"} or config.mode == "eval"):
    directory = os.path.join(workdir, "teacher", "checkpoints")
  else:
    return  # this run trains the teacher itself
  field = "teacher_checkpoint" if config.teacher_checkpoint else "mode"
  saved = checkpoint.saved_config(directory)
  if saved is None:
    raise config_check.ConfigError(
        f"config.{field}: no readable teacher checkpoint under {directory}; train the teacher "
        "first (mode=teacher or experiment) or point config.teacher_checkpoint at one.")
  changed = _misfit(ModelConfig.from_dict(config.teacher),
                    ModelConfig.from_dict(saved.get("teacher", {})))
  if changed:
    raise config_check.ConfigError(
        f"config.teacher: does not fit the teacher checkpoint in {directory} "
        f"({'; '.join(changed)}); set config.teacher to the checkpoint's model.")


def _phase_kwargs(config: Any) -> dict:
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


def frozen_teacher_settings(config: Any, rules) -> tuple[ModelConfig, sharding.Rules]:
  """The teacher as distillation runs it: `config.frozen_teacher` may store its params in
  another dtype (bf16 halves their memory), compute in another dtype and shard them by their own
  rules (say, FSDP over every device); its shapes are always `config.teacher`'s."""
  t_cfg = ModelConfig.from_dict(config.teacher)
  frozen = config.get("frozen_teacher", {})
  t_cfg = dataclasses.replace(t_cfg, dtype=frozen.get("dtype") or t_cfg.dtype,
                              param_dtype=frozen.get("param_dtype") or t_cfg.param_dtype)
  return t_cfg, sharding.parse_rules(frozen.get("sharding_rules")) or rules


def load_teacher(config: Any, workdir: str, mesh, rules) -> loop.Teacher:
  t_cfg, t_rules = frozen_teacher_settings(config, rules)
  if config.get("teacher_hf"):  # read-only, straight into the frozen teacher's shardings
    return loop.Teacher(t_cfg, hf.load_params(config.teacher_hf, t_cfg, mesh, t_rules),
                        param_shardings(t_cfg, mesh, t_rules), rules=t_rules)
  directory = config.teacher_checkpoint or os.path.join(workdir, "teacher", "checkpoints")
  return loop.Teacher(t_cfg, *load_params(t_cfg, directory, mesh, t_rules), rules=t_rules)


def run_experiment_phase(config: Any, workdir: str, phase: str, data: Data, mesh,
                         rules) -> loop.PhaseResult:
  """Runs one of PHASES; 'distilled' loads the teacher from its checkpoint (read-only)."""
  common = dict(phase=phase, phase_dir=os.path.join(workdir, phase), mesh=mesh, rules=rules,
                tokens_per_step=data.tokens_per_step, **_phase_kwargs(config))
  placement = evaluate.Placement(mesh, rules)
  if phase == "teacher":
    t_cfg = ModelConfig.from_dict(config.teacher)
    return _train(model_cfg=t_cfg,
                          val_loss_fn=lambda p: evaluate.held_out_loss(t_cfg, p, data.val_batches,
                                                                       placement),
                          train_cfg=config.teacher_train, seed=config.seed,
                          make_train_iter=lambda: data.make_train_iter(config.seed), **common)
  # Both students: the same init seed and the same batches.
  s_cfg = ModelConfig.from_dict(config.student)
  init = config.get("student_init")
  student = dict(model_cfg=s_cfg, train_cfg=config.student_train, seed=config.seed + 1,
                 init_params=(lambda: hf.load_params(init, s_cfg, mesh, rules)) if init else None,
                 make_train_iter=lambda: data.make_train_iter(config.seed + 1),
                 val_loss_fn=lambda p: evaluate.held_out_loss(s_cfg, p, data.val_batches,
                                                              placement))
  if phase == "distilled":
    return _run_distilled(config, workdir, data, student, common)
  return _train(**student, **common)


def _train(**spec) -> loop.PhaseResult:
  return loop.train_phase(loop.PhaseSpec(**spec))


def _run_distilled(config: Any, workdir: str, data: Data, student: dict, common: dict):
  """The distilled student, from the live teacher, its cache, or its continuations."""
  d, mesh, rules = config.distill, common["mesh"], common["rules"]
  settings = DistillSettings.from_config(d)
  if settings.on_policy is not None:  # the student samples real tokenizer ids only
    tok = data.tokenizer
    shared = min(tok.vocab_size, int(config.teacher.vocab_size), int(config.student.vocab_size))
    settings = dataclasses.replace(settings, on_policy=dataclasses.replace(
        settings.on_policy, vocab_size=shared,
        eos_id=-1 if tok.eos_id is None else int(tok.eos_id)))
  if d.get("sequence_data", ""):  # sequence-level: the teacher's text replaces the train split
    source = teacher_text.load_source(d.sequence_data)
    student["make_train_iter"] = lambda: data.make_stream(source, config.seed + 1)
  if settings.cache_estimator:  # the teacher's log-probs come with each batch; no teacher runs
    cache = teacher_cache.TeacherCache(d.teacher_cache)
    stream = student["make_train_iter"]
    student["make_train_iter"] = lambda: teacher_cache.CachedBatches(stream(), cache)
    return _train(distill=dataclasses.replace(settings, cache_vocab_size=cache.vocab_size),
                          **student, **common)
  if not settings.uses_teacher:  # e.g. sequence-level with alpha = 0: cross-entropy alone
    return _train(**student, **common)
  return _train(teacher=load_teacher(config, workdir, mesh, rules), distill=settings,
                        **student, **common)


def check_teacher_sources(config: Any, workdir: str, phases: tuple[str, ...]) -> None:
  """A teacher cache or sequence-level data that the distilled phase will read must exist and
  belong to this run: checked before any data or compile work."""
  d = config.distill
  if "distilled" not in phases:
    return
  if d.get("teacher_cache", ""):
    try:
      teacher_cache.TeacherCache(d.teacher_cache).check_config(config, workdir)
    except (FileNotFoundError, teacher_cache.CacheMismatch) as e:
      raise config_check.ConfigError(f"config.distill.teacher_cache: {e}") from None
  if d.get("sequence_data", ""):
    try:
      teacher_text.load_source(d.sequence_data)
      record = teacher_text.read_metadata(d.sequence_data)
    except FileNotFoundError as e:
      raise config_check.ConfigError(f"config.distill.sequence_data: {e}") from None
    made_by = ((record.get("metadata") or {}).get("teacher") or {}).get("hash")
    if made_by != teacher_cache.teacher_fingerprint(config, workdir)["hash"]:
      raise config_check.ConfigError(
          f"config.distill.sequence_data: {d.sequence_data} was generated by another teacher "
          "(or one with other settings) than this run's; regenerate it with "
          "scripts/teacher_sequences.py for this config, or point at the right folder.")


def samples(config: Any, cfg: ModelConfig, params: Any, tok, mesh) -> list[str]:
  return sample.generate_texts(
      cfg, params, tok, config.sample_prompts[:config.num_samples],
      max_new_tokens=config.sample_tokens, temperature=config.sample_temperature,
      top_k=config.sample_top_k, rng=jax.random.key(config.seed), mesh=mesh)


def format_table(summary: dict[str, dict[str, float]]) -> str:
  lines = [f"{'model':<10} {'params':>9} {'ppl':>9} {'top1_agree':>10} {'top5_agree':>10} "
           f"{'kl_to_teacher':>13} {'ece':>7}"]
  for name, m in summary.items():
    lines.append(f"{name:<10} {m['params']:>9,d} {m['ppl']:>9.2f} {m['top1_agreement']:>10.4f} "
                 f"{m['top5_agreement']:>10.4f} {m['kl_to_teacher']:>13.4f} {m['ece']:>7.4f}")
  return "\n".join(lines)


def evaluate_phases(config: Any, workdir: str, data: Data, teacher: loop.Teacher,
                    params: dict[str, Any], mesh, rules) -> dict[str, dict[str, float]]:
  """Held-out metrics of every model against the teacher; process 0 writes summary.json
  atomically (every process computes it: evaluation is one data-parallel program)."""
  s_cfg = ModelConfig.from_dict(config.student)
  summary, texts = {}, {}
  for phase, p in params.items():
    cfg, model_rules = (teacher.cfg, teacher.rules) if phase == "teacher" else (s_cfg, rules)
    placement = evaluate.Placement(mesh, model_rules, teacher.rules)
    metrics = evaluate.evaluate(cfg, p, teacher.cfg, teacher.params, data.eval_batches, placement)
    metrics["params"] = sum(x.size for x in jax.tree.leaves(p))
    summary[phase] = metrics
    texts[phase] = samples(config, cfg, p, data.tokenizer, mesh)
  if jax.process_index() == 0:
    path = os.path.join(workdir, "summary.json")
    with open(path + ".tmp", "w") as f:
      json.dump(summary, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    print("\n" + format_table(summary))
    for phase, lines in texts.items():
      print(f"\n--- samples: {phase} ---")
      for line in lines:
        print(repr(line))
    print(f"\nwrote {path}")
  return summary


def phases_to_run(config: Any) -> tuple[str, ...]:
  phases = {"experiment": PHASES, "eval": (), "teacher": ("teacher",),
            "distill": ("distilled",), "scratch": ("scratch",)}[config.mode]
  # A given teacher (a checkpoint or a Hugging Face model) replaces training one.
  given = config.teacher_checkpoint or config.get("teacher_hf")
  return tuple(p for p in phases if not (p == "teacher" and given))


def check_resumable(config: Any, workdir: str, phases: tuple[str, ...]) -> None:
  """Raises ConfigError if a phase would resume a run made with different math settings."""
  current = json.loads(config.to_json())
  for phase in phases:
    directory = os.path.join(workdir, phase, "checkpoints")
    saved = checkpoint.saved_config(directory)
    if saved is not None:
      config_check.check_resume(saved, current, phase, os.path.join(workdir, phase))


def run(config: Any, workdir: str) -> dict[str, Any] | None:
  """Runs `config.mode` in `workdir`; returns the summary for 'experiment' and 'eval'."""
  phases = phases_to_run(config)
  check_resumable(config, workdir, phases)  # before any data or compile work
  check_teacher_checkpoint(config, workdir, phases)
  check_teacher_sources(config, workdir, phases)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config)
  os.makedirs(workdir, exist_ok=True)
  data = prepare_data(config)
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
  cfg = ModelConfig.from_dict(config.teacher if phase == "teacher" else config.student)
  return load_params(cfg, os.path.join(workdir, phase, "checkpoints"), mesh, rules)[0]
