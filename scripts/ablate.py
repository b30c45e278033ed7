"""Runs a config's ablation sweep: the teacher once, then every point; writes tables and plots.

  python scripts/ablate.py --config=configs/shakespeare.py:ablate_smoke --workdir=runs/ablate_smoke
  python scripts/ablate.py --config=configs/shakespeare.py:ablate --workdir=runs/ablate

Needs kdjax installed: `pip install -e .` in the repo root.

On a cluster, one process per point after the teacher is trained:

  python scripts/ablate.py --config=... --workdir=W --teacher_only
  python scripts/ablate.py --config=... --workdir=W --index=$TASK_ID   # for each point
  python scripts/ablate.py --config=... --workdir=W --report_only      # tables and plots

Finished points are skipped (their result.json exists); an interrupted point resumes from its
checkpoints. Every point uses the config's seed, so each differs from the others by its
overrides alone. Writes into the workdir: results.csv (deterministic: a rerun on CPU gives the
same bytes), results.md, timings.csv, and PNG plots (kdjax.plots): one per sweep group and the
training curves of every run.
"""

from __future__ import annotations

import os
import sys

import kdjax  # noqa: F401  (XLA flags before JAX starts)

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from kdjax import ablation, cli, config_check, loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config with a sweep, e.g. "
                                          "configs/shakespeare.py:ablate.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's workdir.")
_INDEX = flags.DEFINE_integer("index", -1, "Run only point i (0-based; -1 = all, in order). The "
                              "teacher must exist already (see --teacher_only).")
_TEACHER_ONLY = flags.DEFINE_bool("teacher_only", False, "Train the shared teacher and stop.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Write tables and plots of the finished "
                                 "points; train nothing.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required.")
  absl_logging.set_verbosity(absl_logging.ERROR)
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  try:
    runner = ablation.Runner(_CONFIG.value, _WORKDIR.value)
    if not 0 <= _INDEX.value < len(runner.points) and _INDEX.value != -1:
      raise config_check.ConfigError(
          f"--index: {_INDEX.value} is not a point of this sweep (0..{len(runner.points) - 1}).")
    runner.check()
    if not _REPORT_ONLY.value:
      if _INDEX.value == -1:
        runner.train_teacher()
      elif not os.path.isdir(runner.teacher_dir):
        raise config_check.ConfigError(
            f"--index: no teacher at {runner.teacher_dir}; run with --teacher_only first.")
      if not _TEACHER_ONLY.value:
        chosen = runner.points if _INDEX.value == -1 else [runner.points[_INDEX.value]]
        for point in chosen:
          done = runner.result(point) is not None
          ablation.log(f"{point.name} ({point.phase}, {ablation.run_key(runner.config, point)})"
                       f"{': finished, skipped' if done else ''}")
          row = runner.run_point(point)
          if not done:
            ablation.log(f"{point.name}: ppl {row['ppl']:.2f} in {row['seconds']} s")
    for path in ablation.report(runner):
      print(path)
  except (config_check.ConfigError, FileNotFoundError) as e:
    cli.fail(cli.one_line(e), prog="ablate")
  except loop.Preempted as e:
    print(f"ablate: {e}", file=sys.stderr)
    sys.exit(143)


if __name__ == "__main__":
  app.run(main)
