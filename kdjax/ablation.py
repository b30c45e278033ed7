"""Ablation sweeps: per seed, one shared teacher, then one student phase per point; then tables.

A config that holds a sweep (`config.sweep`, a list of points; see configs/shakespeare.py's
`:ablate` presets) names each point as

  {"name": "T2_a0.5", "group": "temperature_alpha", "phase": "distilled" | "scratch",
   "overrides": {"distill.temperature": 2.0, "distill.alpha": 0.5}}

and `config.sweep_seeds` (or scripts/ablate.py --seeds) the seeds every point runs with (default:
config.seed alone). Within a seed every point starts from the same config (same student init,
same batches) with its overrides applied, and distills from the same teacher, trained once per
seed in `<workdir>/seed<s>/teacher` (or config.teacher_checkpoint, then shared by all seeds).
Points whose overrides amount to the same run (say, the baseline of two groups) share one run
directory, `<workdir>/seed<s>/points/<key>`, named after the overrides that differ from the base
config. A point is finished when its `result.json` exists, so an interrupted sweep resumes at the
first unfinished point, and a point's own phase resumes from its checkpoints.

Every point is evaluated on the validation split (`val_*`: what chooses between points) and on the
test split (`test_*`: what is reported). `results.csv` (kdjax.report) has one row per point and
seed, in sweep order, deterministic values only, so a rerun on CPU writes the same bytes;
`results.md` gives mean ± sd over seeds, the best point of each group by validation, and paired
differences (kdjax.sweep_stats). Wall times go to `timings.csv`.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from typing import Any

import jax

from kdjax import (config_check, evaluate, experiment, inputs, lora, plots, preflight, settings,
                   sharding)
from kdjax.report import METRICS, write_json, write_results
from kdjax.settings import ModelSources

PHASES = ("distilled", "scratch")


@dataclasses.dataclass(frozen=True)
class Point:
  name: str
  group: str
  phase: str
  overrides: tuple[tuple[str, Any], ...]  # sorted (dotted field, value) pairs

  @property
  def overrides_dict(self) -> dict[str, Any]:
    return dict(self.overrides)


def points(config: Any) -> list[Point]:
  """The sweep's points, in order; a malformed point raises ConfigError naming it."""
  sweep = config.get("sweep")  # only a config with a sweep (an :ablate preset) has the field
  if not sweep:
    raise config_check.ConfigError(
        "config.sweep: this config has no sweep; use a preset that defines one, e.g. "
        "configs/shakespeare.py:ablate_smoke.")
  out, names = [], set()
  for i, p in enumerate(sweep):
    where = f"config.sweep[{i}]"
    if not isinstance(p, dict) or not {"name", "phase"} <= set(p):
      raise config_check.ConfigError(f"{where}: write {{'name': ..., 'group': ..., 'phase': ..."
                                     ", 'overrides': {{...}}}}.")
    if p["phase"] not in PHASES:
      raise config_check.ConfigError(f"{where}.phase: {p['phase']!r}; use one of {PHASES}.")
    if p["name"] in names or not re.fullmatch(r"[\w.+-]+", p["name"]):
      raise config_check.ConfigError(f"{where}.name: {p['name']!r} must be unique and use only "
                                     "letters, digits, '_', '.', '+', '-'.")
    names.add(p["name"])
    overrides = tuple(sorted(dict(p.get("overrides", {})).items()))
    out.append(Point(p["name"], p.get("group", ""), p["phase"], overrides))
  return out


def seeds(config: Any, given: list[int] | None = None) -> list[int]:
  """The seeds every point runs with: `given` (--seeds), else config.sweep_seeds, else
  config.seed alone."""
  field = "--seeds" if given is not None else "config.sweep_seeds"
  chosen = list(given if given is not None else config.get("sweep_seeds") or [config.seed])
  if (not chosen or not all(isinstance(s, int) and s >= 0 for s in chosen)
      or len(set(chosen)) != len(chosen)):
    raise config_check.ConfigError(f"{field}: {chosen!r}; give distinct integers >= 0, e.g. "
                                   "--seeds=0,1,2.")
  return chosen


def _set(config: Any, dotted: str, value: Any) -> None:
  *path, leaf = dotted.split(".")
  node = config
  for key in path:
    node = node[key]
  if leaf not in node:
    raise KeyError(f"no field {dotted}")
  node[leaf] = value  # ConfigDict refuses a value of another type


def point_config(config: Any, point: Point, teacher_dir: str, seed: int | None = None) -> Any:
  """The base config with the point's overrides and `seed` (default: config.seed), running its
  phase from the shared teacher.

  A deep copy keeps the config's field references, so an override of, say, data.vocab_size
  reaches every field that refers to it, as a --config.data.vocab_size flag would.
  """
  c = copy.deepcopy(config)
  for dotted, value in point.overrides:
    try:
      _set(c, dotted, value)
    except (KeyError, TypeError, ValueError) as e:
      raise config_check.ConfigError(
          f"config.sweep point {point.name!r}: cannot set {dotted}={value!r} ({e}); override "
          "an existing field with a value of its type.") from None
  c.sweep = []
  if seed is not None:
    c.seed = seed
  c.mode = {"distilled": "distill", "scratch": "scratch"}[point.phase]
  if not ModelSources.from_config(c).teacher_given:
    c.teacher_checkpoint = teacher_dir
  return c


def run_key(base: Any, point: Point) -> str:
  """The run directory's name: the phase and the overrides that change the base config."""
  flat = config_check.flatten(base)
  changed = [(k, v) for k, v in point.overrides if flat.get(k) != v]
  if not changed:
    return f"{point.phase}-base"
  text = "_".join(f"{k.split('.')[-1]}{v}" for k, v in changed)
  slug = re.sub(r"[^\w.+-]", "", text)[:60]
  digest = hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]
  return f"{point.phase}-{slug}-{digest}"


class Runner:
  """Runs points of one sweep in one process; data is loaded once, each seed's teacher once."""

  def __init__(self, config: Any, workdir: str, seed_list: list[int] | None = None):
    self.config, self.workdir = config, os.path.abspath(workdir)
    self.points = points(config)
    self.seeds = seeds(config, seed_list)
    self.mesh = sharding.make_mesh(config.mesh)
    self.rules = sharding.rules_from_config(config)
    self._data, self._teachers = {}, {}

  def distinct_points(self) -> list[Point]:
    """The first point of each distinct run, in sweep order: what --index counts, so that
    processes given different indices never share a run directory."""
    first: dict[str, Point] = {}
    for p in self.points:
      first.setdefault(run_key(self.config, p), p)
    return list(first.values())

  def seed_dir(self, seed: int) -> str:
    return os.path.join(self.workdir, f"seed{seed}")

  def teacher_dir(self, seed: int) -> str:
    given = ModelSources.from_config(self.config).teacher_checkpoint
    return given or os.path.join(self.seed_dir(seed), "teacher", "checkpoints")

  def check(self) -> None:
    """Every point's config passes config_check: before the teacher or any point runs (the
    files a point reads, its teacher among them, are checked by preflight before it runs)."""
    for p in self.points:
      for seed in self.seeds:
        config_check.check_config(point_config(self.config, p, self.teacher_dir(seed), seed),
                                  jax.device_count(), jax.process_count())

  def train_teacher(self, seed: int) -> None:
    if ModelSources.from_config(self.config).teacher_given:
      return
    c = copy.deepcopy(self.config)
    c.sweep, c.mode, c.seed = [], "teacher", seed
    experiment.run(c, self.seed_dir(seed))

  def point_dir(self, point: Point, seed: int) -> str:
    return os.path.join(self.seed_dir(seed), "points", run_key(self.config, point))

  def result(self, point: Point, seed: int) -> dict[str, Any] | None:
    path = os.path.join(self.point_dir(point, seed), "result.json")
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def _data_for(self, config: Any) -> inputs.Data:
    key = json.dumps(config.data.to_dict(), sort_keys=True)
    if key not in self._data:
      self._data[key] = inputs.prepare_data(config)
    return self._data[key]

  def run_point(self, point: Point, seed: int) -> dict[str, Any]:
    """Trains the point's phase for `seed` (resuming it), evaluates it on the validation and
    test splits; writes result.json."""
    done = self.result(point, seed)
    if done is not None:
      return done
    c = point_config(self.config, point, self.teacher_dir(seed), seed)
    directory = self.point_dir(point, seed)
    start = time.time()
    phases = preflight.preflight(c, directory)
    os.makedirs(directory, exist_ok=True)
    data = self._data_for(c)
    (phase,) = phases
    trained = experiment.run_experiment_phase(c, directory, phase, data, self.mesh, self.rules)
    if seed not in self._teachers:
      self._teachers[seed] = experiment.load_teacher(c, directory, self.mesh, self.rules)
    teacher = self._teachers[seed]
    s_cfg = settings.student_model(c)
    placement = evaluate.Placement(self.mesh, self.rules, teacher.rules)
    row = {}
    for split, batches in (("val", data.val_batches), ("test", data.eval_batches)):
      metrics = evaluate.evaluate(s_cfg, trained.params, teacher.cfg, teacher.params, batches,
                                  placement,
                                  settings.DataSettings.from_config(c.data).eval_chunk_size)
      row.update({f"{split}_{k}": metrics[k] for k in METRICS})
    row.update(params=sum(x.size for x in jax.tree.leaves(lora.merged(s_cfg, trained.params))),
               train_tokens=int(c.student_train.steps) * data.tokens_per_step,
               seconds=round(time.time() - start, 1))
    if jax.process_index() == 0:
      write_json(os.path.join(directory, "result.json"), row)
    return row

  def rows(self) -> list[dict[str, Any]]:
    """One row per finished point and seed: in sweep order, then seed order."""
    out = []
    for p in self.points:
      for seed in sorted(self.seeds):
        r = self.result(p, seed)
        if r is not None:
          out.append({**r, "name": p.name, "group": p.group, "phase": p.phase, "seed": seed,
                      "overrides": json.dumps(p.overrides_dict, sort_keys=True),
                      "run": run_key(self.config, p)})
    return out


def report(runner: Runner) -> list[str]:
  """Writes results.csv, results.md, timings.csv and plots/*.png of the finished points;
  returns their paths. The training curves are the first seed's."""
  rows = runner.rows()
  paths = write_results(runner.workdir, rows)
  plot_dir = os.path.join(runner.workdir, "plots")
  os.makedirs(plot_dir, exist_ok=True)
  with open(paths["results.csv"]) as f:  # the plots read what the table says
    table = list(csv.DictReader(f))
  written = plots.sweep_plots(table, plot_dir)
  first = min(runner.seeds)
  seed_dir = runner.seed_dir(first)
  shown = [r for r in rows if r["seed"] == first]
  for group in dict.fromkeys(r["group"] for r in shown):
    curves = {r["name"]: os.path.join(seed_dir, "points", r["run"], r["phase"], "metrics.jsonl")
              for r in shown if r["group"] == group}
    written.append(plots.training_curves(
        curves, os.path.join(plot_dir, f"curves_{group or 'points'}.png"),
        title=f"student training loss, seed {first}: {group}"))
  teacher_metrics = os.path.join(seed_dir, "teacher", "metrics.jsonl")
  if os.path.exists(teacher_metrics):
    written.append(plots.training_curves({"teacher": teacher_metrics},
                                         os.path.join(plot_dir, "curves_teacher.png"),
                                         title=f"teacher training loss, seed {first}"))
  return list(paths.values()) + written


def log(message: str) -> None:
  print(f"ablate: {message}", file=sys.stderr, flush=True)
