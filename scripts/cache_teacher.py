"""Runs the teacher once over the distilled phase's training batches and caches its top-k.

  python scripts/cache_teacher.py --config=configs/shakespeare.py --workdir=runs/shakespeare \
      --top_k=32 [--estimator_samples=32] [--logprob_dtype=float16]
  python scripts/cache_teacher.py --config=configs/shakespeare.py --workdir=runs/shakespeare \
      --report [--report_k=8,32,128] [--student=distilled]

Needs kdjax installed: `pip install -e .` in the repo root.

The teacher is loaded exactly as the distilled phase loads it (config.teacher_checkpoint,
config.teacher_hf or `<workdir>/teacher`, with config.frozen_teacher's dtypes and rules), and runs
jitted on the config's mesh, batches split over (data, fsdp) as in evaluation. The batches are
the ones the distilled phase sees at steps 1..config.student_train.steps (data seed
config.seed + 1). The cache goes to `<workdir>/teacher_cache/k{K}` (`k{K}_s{N}` with
--estimator_samples=N; `s{N}` with --top_k=0); an existing cache is never overwritten, and an
interrupted build resumes from its last complete shard. See kdjax/teacher_cache/format.py for
the format, kdjax/teacher_cache/estimators.py for the estimators. Prints one JSON line: the
manifest's summary.

--report builds, for each K of --report_k, caches of the held-out eval batches (top-k K, and K
samples), reads them back, and compares each estimator's soft loss with the live teacher's
forward KL for --student (a phase of this workdir, 'random', or a checkpoints folder), at
config.distill.temperature: bytes per token (raw and on disk), the token-mean value and its gap,
the mean per-token |error|, and the cosine between the estimator's gradient with respect to the
student's logits and the live loss's. It writes `<workdir>/teacher_cache/report.json`.

One process only (the writer holds whole global batches).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import kdjax  # noqa: F401  (XLA flags before JAX starts)

from absl import app, flags
from absl import logging as absl_logging
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from kdjax import (cli, config_check, evaluate, experiment, inputs, preflight, sharding,
                   teacher_cache)
from kdjax.model import ModelConfig, Transformer
from kdjax.state import init_params
from kdjax.teacher_cache import estimators as cache_estimators

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The experiment's workdir (teacher, students).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Teacher ids cached per token (0: samples only).")
_SAMPLES = flags.DEFINE_integer("estimator_samples", 0, "Also cache this many i.i.d. draws per "
                                "token from the teacher at config.distill.temperature (the "
                                "'sampled' estimator); 0 = none.")
_DTYPE = flags.DEFINE_enum("logprob_dtype", "float16", ["float16", "float32"],
                           "Storage dtype of the cached log-probs.")
_SHARD_STEPS = flags.DEFINE_integer("shard_steps", 0, "Steps per file; 0 = about 256 MiB each.")
_REPORT = flags.DEFINE_bool("report", False, "Measure bytes/token and the KL gap instead.")
_REPORT_K = flags.DEFINE_list("report_k", ["8", "32", "128"], "--report: the k values.")
_STUDENT = flags.DEFINE_string("student", "distilled", "--report: 'distilled', 'scratch', "
                               "'random', or a checkpoints folder of config.student's model.")


def cache_dir(workdir: str, top_k: int, samples: int) -> str:
  name = "_".join(([f"k{top_k}"] if top_k else []) + ([f"s{samples}"] if samples else []))
  return os.path.join(workdir, "teacher_cache", name)


def _log(message: str) -> None:
  print(f"cache_teacher: {message}", file=sys.stderr, flush=True)


def build_cache(config, workdir: str, top_k: int, samples: int, logprob_dtype: str = "float16",
                shard_steps: int = 0) -> dict:
  """Builds the cache of the distilled phase's training batches; returns its manifest."""
  preflight.preflight(config, workdir, ("distilled",), teacher_only=True)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_from_config(config)
  manifest = teacher_cache.plan(config, workdir, top_k=top_k, samples=samples,
                                logprob_dtype=logprob_dtype, shard_steps=shard_steps)
  directory = cache_dir(workdir, top_k, samples)
  if os.path.exists(directory):  # before loading anything
    raise FileExistsError(f"{directory} exists; a teacher cache is never overwritten.")
  data = inputs.prepare_data(config)
  teacher = experiment.load_teacher(config, workdir, mesh, rules)
  targets = teacher_cache.make_targets_fn(
      teacher.cfg, teacher.params, mesh, teacher.rules, top_k=top_k, samples=samples,
      vocab_size=manifest["vocab_size"], sample_seed=manifest["sample_seed"],
      sample_temperature=manifest["sample_temperature"])
  return teacher_cache.build(directory, manifest,
                             lambda: data.make_train_iter(manifest["data_seed"]), targets, _log)


# ---------------------------------------------------------------------------------- --report


class _ListIterator:
  """A list of batches as a data iterator with get/set_state (what build() needs)."""

  def __init__(self, batches):
    self.batches, self.index = batches, 0

  def __next__(self):
    self.index += 1
    return self.batches[self.index - 1]

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = state["index"]


def make_gap_step(s_cfg: ModelConfig, t_cfg: ModelConfig, estimators: tuple[str, ...],
                  vocab_size: int, temperature: float):
  """cache_estimators.gap_sums of one eval batch, from both models' logits (jitted)."""
  s_model, t_model = Transformer(s_cfg), Transformer(t_cfg)
  apply = lambda m, p, b: m.apply({"params": p}, b["inputs"], b["segment_ids"], b["positions"])

  @jax.jit
  def step(s_params, t_params, batch, cached):
    s_logits_BxLxV = apply(s_model, s_params, batch)[..., :vocab_size]
    t_logits_BxLxV = apply(t_model, t_params, batch)[..., :vocab_size]
    return (cache_estimators.gap_sums(s_logits_BxLxV, t_logits_BxLxV, cached, batch["mask"],
                                      estimators=estimators, temperature=temperature),
            jnp.sum(batch["mask"]))

  return step


def _student_params(config, workdir: str, which: str, mesh, rules):
  s_cfg = ModelConfig.from_dict(config.student)
  if which == "random":
    return init_params(s_cfg, jax.random.key(config.seed + 1), mesh, rules)
  directory = (os.path.join(workdir, which, "checkpoints") if which in ("distilled", "scratch")
               else which)
  return experiment.load_params(s_cfg, directory, mesh, rules)[0]


def _measure(cache_path: str, manifest: dict, estimators: tuple[str, ...], step_fn, s_params,
             t_params, batches, placement) -> list[dict]:
  """One report row per estimator: the cached eval batches against the live teacher."""
  cache = teacher_cache.TeacherCache(cache_path)
  sums, tokens, top_mass = {}, 0.0, 0.0
  for i, batch in enumerate(batches):
    cached = cache.batch(i + 1, tokens=batch)
    if cache_estimators.RESIDUAL in cached:  # how much of the teacher the top-k hold
      top_mass += float(np.sum(-np.expm1(cached[cache_estimators.RESIDUAL]) * batch["mask"]))
    with jax.set_mesh(placement.mesh):
      out, n = jax.device_get(step_fn(s_params, t_params, placement.batch(batch),
                                      placement.batch(cached)))
    sums = {key: sums.get(key, 0.0) + float(v) for key, v in out.items()}
    tokens += float(n)
  live = sums["live"] / tokens
  return [{"estimator": name, "teacher_topk_mass": top_mass / tokens if cache.top_k else None,
           "bytes_per_token": teacher_cache.bytes_per_token(manifest, name),
           "disk_bytes_per_token": manifest["disk_bytes_per_token"], "live_kl": live,
           "estimate": sums[name] / tokens, "gap": sums[name] / tokens - live,
           "relative_gap": (sums[name] / tokens - live) / live if live else float("nan"),
           "mean_abs_token_error": sums[name + "_abs"] / tokens,
           "grad_cosine": sums[name + "_gl"] / np.sqrt(sums[name + "_gg"] * sums["live_gg"]),
           "tokens": tokens} for name in estimators]


def report(config, workdir: str, ks: list[int], student: str = "distilled",
           logprob_dtype: str = "float16") -> dict:
  """Bytes per token and the held-out KL gap of every estimator for each k (see the docstring)."""
  preflight.preflight(config, workdir, ("distilled",), teacher_only=True)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_from_config(config)
  data = inputs.prepare_data(config)
  teacher = experiment.load_teacher(config, workdir, mesh, rules)
  s_params = _student_params(config, workdir, student, mesh, rules)
  s_cfg = ModelConfig.from_dict(config.student)
  vocab, temperature = teacher_cache.vocab_size(config), float(config.distill.temperature)
  scratch = os.path.join(workdir, "teacher_cache", ".report")  # eval caches, deleted after use
  shutil.rmtree(scratch, ignore_errors=True)
  rows = []
  for k in ks:
    # A top-k cache serves both top-k estimators; the sampled one gets k draws of its own.
    for top_k, samples, estimators in ((k, 0, ("topk_renorm", "topk_residual")),
                                       (0, k, ("sampled",))):
      if top_k > vocab:
        continue
      manifest = teacher_cache.plan(config, workdir, top_k=top_k, samples=samples,
                                    logprob_dtype=logprob_dtype, steps=len(data.eval_batches),
                                    batch_size=config.data.eval_batch_size)
      path = os.path.join(scratch, f"k{top_k}_s{samples}")
      manifest = teacher_cache.build(
          path, manifest, lambda: _ListIterator(data.eval_batches),
          teacher_cache.make_targets_fn(teacher.cfg, teacher.params, mesh, teacher.rules,
                                        top_k=top_k, samples=samples, vocab_size=vocab,
                                        sample_seed=manifest["sample_seed"],
                                        sample_temperature=manifest["sample_temperature"]))
      step_fn = make_gap_step(s_cfg, teacher.cfg, estimators, vocab, temperature)
      for row in _measure(path, manifest, estimators, step_fn, s_params, teacher.params,
                          data.eval_batches, evaluate.Placement(mesh)):
        rows.append(dict(row, k=k, logprob_dtype=logprob_dtype, temperature=temperature,
                         student=student))
      shutil.rmtree(path)
  shutil.rmtree(scratch, ignore_errors=True)
  out = {"rows": rows, "vocab_size": vocab}
  path = os.path.join(workdir, "teacher_cache", "report.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  return out


def format_report(rows: list[dict]) -> str:
  """The rows as a table: `mass` is the teacher's mean probability on its top-k ids."""
  lines = [f"{'k':>4} {'estimator':<14} {'mass':>5} {'B/tok':>6} {'disk':>6} {'live KL':>8} "
           f"{'estimate':>9} {'gap':>8} {'rel':>7} {'|err|/tok':>9} {'grad cos':>8}"]
  for r in rows:
    mass = "-" if r["teacher_topk_mass"] is None else f"{r['teacher_topk_mass']:.3f}"
    lines.append(f"{r['k']:>4} {r['estimator']:<14} {mass:>5} {r['bytes_per_token']:>6.1f} "
                 f"{r['disk_bytes_per_token']:>6.1f} {r['live_kl']:>8.4f} "
                 f"{r['estimate']:>9.4f} {r['gap']:>+8.4f} {r['relative_gap']:>+7.1%} "
                 f"{r['mean_abs_token_error']:>9.4f} {r['grad_cosine']:>8.4f}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None or not workdir:
    raise app.UsageError("--config and --workdir are required.")
  if _TOP_K.value is None and not _REPORT.value:
    raise app.UsageError("--top_k is required (0 with --estimator_samples for samples only).")
  if jax.process_count() > 1:
    raise app.UsageError("cache_teacher.py runs on one process (it writes whole global batches).")
  # Orbax and TFDS log routine progress at INFO/WARNING; the user sees this script's own lines.
  absl_logging.set_verbosity(absl_logging.ERROR)
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  workdir = os.path.abspath(workdir)
  start = time.time()
  try:
    if _REPORT.value:
      out = report(config, workdir, [int(k) for k in _REPORT_K.value], _STUDENT.value,
                   _DTYPE.value)
      print(format_report(out["rows"]))
      return
    manifest = build_cache(config, workdir, _TOP_K.value, _SAMPLES.value, _DTYPE.value,
                           _SHARD_STEPS.value)
  except (config_check.ConfigError, teacher_cache.CacheMismatch, FileExistsError,
          FileNotFoundError) as e:
    cli.fail(cli.one_line(e), prog="cache_teacher")
  summary = {k: manifest[k] for k in ("top_k", "samples", "steps", "vocab_size", "logprob_dtype",
                                      "bytes_per_token", "disk_bytes_per_token", "num_shards")}
  print(json.dumps(dict(summary, path=cache_dir(workdir, _TOP_K.value, _SAMPLES.value),
                        seconds=round(time.time() - start, 1))))


if __name__ == "__main__":
  app.run(main)
