"""kdjax entry point: the only module that defines flags.

  python -m kdjax.main --config=configs/shakespeare.py --workdir=runs/shakespeare
  python -m kdjax.main --config=configs/shakespeare.py:smoke --workdir=runs/smoke \
      --config.distill.temperature=2

The config is a Python file (never a pickle) whose `get_config(arg)` returns a locked ConfigDict:
an override of a field it lacks, or of the wrong type, is refused at flag parsing.
"""

from __future__ import annotations

import os
import sys
import tempfile

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from kdjax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/shakespeare.py:smoke.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, summary.json.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0, the same on every host. "
    "Omit on Cloud TPU VMs and SLURM, where JAX reads it from the environment.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's id, 0..N-1.")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with every config-override problem turned into one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
    if "Traceback" in message:  # a config file's get_config raised: its last line says what
      last = [l for l in message.splitlines() if l.strip()][-1].strip()  # "pkg.Error: why"
      reason = last.split(": ", 1)[1] if ": " in last else last
      message = f"{message.split(': ', 1)[0]}: {reason.rstrip('.')}"
    cli.fail(f"{message}; fix the flag (run with --helpshort to list flags).")
  except (AttributeError, KeyError) as e:
    # ml_collections: an override names a field the locked config does not have.
    raw = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\n", " ")
    detail = " ".join(raw.replace("\\", "").replace("'", "").split())
    cli.fail(f"--config override: unknown config field: {detail} Only fields defined in the "
             "config file can be set.")
  except (TypeError, ValueError) as e:
    cli.fail(f"--config: {cli.one_line(e)}; check the config file, preset and overrides.")
  return []  # unreachable: cli.fail exits


def _check_writable(workdir: str) -> None:
  """Creates the workdir if needed and proves it takes a file, before any work starts."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".kdjax-write-check-"):
      pass
  except OSError as e:
    cli.fail(f"--workdir: {workdir} is not a writable directory ({e.strerror or e}); choose "
             "another.")


def main(argv) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}; pass options as --flag=value.")
  # Imported here so that `--help` and flag errors come before JAX starts.
  from kdjax import config_check, distributed, experiment, inputs, loop, preflight
  from kdjax.data.records import DataError

  config = _CONFIG.value
  if config is None:
    cli.fail("--config is required, e.g. --config=configs/shakespeare.py.")
  if not _WORKDIR.value:
    cli.fail("--workdir is required, e.g. --workdir=runs/shakespeare.")
  # Orbax and TFDS log routine progress through absl at INFO/WARNING; users see kdjax's own output.
  absl_logging.set_verbosity(absl_logging.INFO if _VERBOSE.value else absl_logging.ERROR)
  given = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in given) and not distributed.cluster_detected():
    if not all(v is not None for v in given):
      cli.fail("--coordinator_address, --num_processes and --process_id go together outside "
               "TPU/SLURM clusters; give all three (the same address on every host).")
    if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
      cli.fail(f"--process_id: {_PROCESS_ID.value} is not in [0, --num_processes="
               f"{_NUM_PROCESSES.value}); number the processes 0..N-1.")
  try:
    distributed.initialize(*given)
  except (RuntimeError, ValueError) as e:
    if _VERBOSE.value:
      raise
    cli.fail(f"jax.distributed.initialize: {cli.one_line(e, 300)}; check the "
             "coordinator address (reachable from every host) and the process flags.")
  if not _VERBOSE.value:
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
  workdir = os.path.abspath(_WORKDIR.value)
  try:
    if "task" in config:  # task distillation (kdjax.task): its own phases and data
      from kdjax import task
      task.preflight(config, workdir)
      task_data = task.prepare(config)  # bad data is refused before the workdir is touched
      _check_writable(workdir)
      task.run(config, workdir, task_data)
      return
    phases = preflight.preflight(config, workdir)  # before any data or compile work
    data = inputs.prepare_data(config)  # bad data is refused before the workdir is touched
    _check_writable(workdir)
    experiment.run(config, workdir, phases, data)
  except loop.Preempted as e:
    print(f"kdjax: {e}", file=sys.stderr)
    sys.exit(143)  # 128 + SIGTERM, what schedulers expect from a preempted job
  except (OSError, RuntimeError, ValueError) as e:
    # ConfigError (a ValueError) from preflight, missing files, a failed corpus download.
    if _VERBOSE.value:
      raise
    cli.fail(cli.one_line(e) if isinstance(e, (config_check.ConfigError, DataError))
             else f"{type(e).__name__}: {cli.one_line(e)}")


def run() -> None:
  """The `kdjax` console script: the same as `python -m kdjax.main`."""
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
