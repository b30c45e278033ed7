"""Runs a config's ablation sweep: per seed, the teacher once, then every point; writes tables
and plots.

  python scripts/ablate.py --config=configs/shakespeare.py:ablate_smoke --workdir=runs/ablate_smoke
  python scripts/ablate.py --config=configs/shakespeare.py:ablate --workdir=runs/ablate
  python scripts/ablate.py --config=configs/shakespeare.py:ablate --workdir=runs/ablate --seeds=0

Needs kdjax installed: `pip install -e .` in the repo root.

On a cluster, one process per (seed, point) after each seed's teacher is trained:

  python scripts/ablate.py --config=... --workdir=W --seeds=$SEED --teacher_only  # per seed
  python scripts/ablate.py --config=... --workdir=W --seeds=$SEED --index=$I      # per run
  python scripts/ablate.py --config=... --workdir=W --report_only     # tables and plots, all seeds

Finished points are skipped (their result.json exists); an interrupted point resumes from its
checkpoints. Within a seed every point has the same init and batches, so each differs from the
others by its overrides alone. Writes into the workdir: results.csv (one row per point and seed,
validation and test metrics; deterministic: a rerun on CPU gives the same bytes), results.md
(mean ± sd over seeds, each group's best point by validation, paired differences), timings.csv,
and PNG plots (kdjax.plots) with the seeds' spread as error bars.
"""

from __future__ import annotations

import os
import re
import sys

import kdjax  # noqa: F401  (XLA flags before JAX starts)

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from kdjax import ablation, cli, config_check, loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config with a sweep, e.g. "
                                          "configs/shakespeare.py:ablate.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's workdir.")
_INDEX = flags.DEFINE_integer("index", -1, "Run only distinct run i (0-based, in sweep order; "
                              "points that share a run count once; -1 = all). The seed's teacher "
                              "must exist already (see --teacher_only).")
_SEEDS = flags.DEFINE_list("seeds", None, "Seeds to run, e.g. 0,1,2 (default: the config's "
                           "sweep_seeds, else its seed). The report covers every seed finished.")
_TEACHER_ONLY = flags.DEFINE_bool("teacher_only", False, "Train the shared teacher and stop.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Write tables and plots of the finished "
                                 "points; train nothing.")


def _seeds() -> list[int] | None:
  if _SEEDS.value is None:
    return None
  try:
    return [int(s) for s in _SEEDS.value]
  except ValueError:
    raise config_check.ConfigError(f"--seeds: {','.join(_SEEDS.value)!r}; give integers, "
                                   "e.g. --seeds=0,1,2.") from None


def _seeds_in_workdir(runner: ablation.Runner) -> list[int]:
  found = [int(d[4:]) for d in os.listdir(runner.workdir) if re.fullmatch(r"seed\d+", d)
           ] if os.path.isdir(runner.workdir) else []
  return sorted(set(found) | set(runner.seeds))


def _run_seed(runner: ablation.Runner, seed: int) -> None:
  if _INDEX.value == -1:
    runner.train_teacher(seed)
  elif not os.path.isdir(runner.teacher_dir(seed)):
    raise config_check.ConfigError(f"--index: no teacher at {runner.teacher_dir(seed)}; run "
                                   f"with --seeds={seed} --teacher_only first.")
  if _TEACHER_ONLY.value:
    return
  chosen = runner.points if _INDEX.value == -1 else [runner.distinct_points()[_INDEX.value]]
  for point in chosen:
    done = runner.result(point, seed) is not None
    ablation.log(f"seed {seed}: {point.name} ({point.phase}, "
                 f"{ablation.run_key(runner.config, point)}){': finished, skipped' if done else ''}")
    row = runner.run_point(point, seed)
    if not done:
      ablation.log(f"seed {seed}: {point.name}: val ppl {row['val_ppl']:.2f}, test ppl "
                   f"{row['test_ppl']:.2f} in {row['seconds']} s")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required.")
  absl_logging.set_verbosity(absl_logging.ERROR)
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  try:
    runner = ablation.Runner(_CONFIG.value, _WORKDIR.value, _seeds())
    runs = len(runner.distinct_points())
    if not 0 <= _INDEX.value < runs and _INDEX.value != -1:
      raise config_check.ConfigError(
          f"--index: {_INDEX.value} is not a run of this sweep (0..{runs - 1}).")
    runner.check()
    if not _REPORT_ONLY.value:
      for seed in runner.seeds:
        _run_seed(runner, seed)
    # The report covers every seed with results in the workdir, whichever process ran it.
    runner = ablation.Runner(_CONFIG.value, _WORKDIR.value, _seeds_in_workdir(runner))
    for path in ablation.report(runner):
      print(path)
  except (config_check.ConfigError, FileNotFoundError) as e:
    cli.fail(cli.one_line(e), prog="ablate")
  except loop.Preempted as e:
    print(f"ablate: {e}", file=sys.stderr)
    sys.exit(143)


if __name__ == "__main__":
  app.run(main)
