"""Metric logging: metrics.jsonl rows and the optional Weights & Biases run (a stand-in module:
wandb itself is not a dependency)."""

import json
import sys
import types

from kdjax.metric_log import MetricLog


class _FakeRun:
  def __init__(self, calls, kwargs):
    self.calls, self.kwargs = calls, kwargs

  def log(self, row, step):
    self.calls.append(("log", step, row))

  def finish(self):
    self.calls.append(("finish",))


def _fake_wandb(monkeypatch):
  calls, runs = [], []

  def init(**kwargs):
    runs.append(_FakeRun(calls, kwargs))
    return runs[-1]

  monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
  return calls, runs


def _log(phase_dir, start, steps, **kw):
  log = MetricLog(str(phase_dir), phase="distilled", start_step=start, total_steps=10,
                  tokens_per_step=64, show_progress=False, **kw)
  for step in steps:
    log.write(step, {"loss": 1.0 / step, "soft_loss": 0.5})
  log.close()


def test_rows_go_to_jsonl_and_to_wandb_when_enabled(tmp_path, monkeypatch):
  calls, runs = _fake_wandb(monkeypatch)
  settings = {"enabled": True, "project": "p", "entity": "", "group": "g"}
  _log(tmp_path / "distilled", 0, [1, 2], wandb=settings, config={"seed": 3})
  rows = [json.loads(l) for l in open(tmp_path / "distilled" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2]
  (run,) = runs
  assert run.kwargs["project"] == "p" and run.kwargs["group"] == "g"
  assert run.kwargs["entity"] is None and run.kwargs["name"] == "distilled"
  assert run.kwargs["config"] == {"seed": 3} and run.kwargs["resume"] == "allow"
  logged = [c for c in calls if c[0] == "log"]
  assert [c[1] for c in logged] == [1, 2]
  assert logged[0][2]["train/loss"] == 1.0 and "train/tokens_per_sec" in logged[1][2]
  assert calls[-1] == ("finish",)
  # A resumed phase (same directory) continues the same W&B run.
  _log(tmp_path / "distilled", 2, [3], wandb=settings)
  assert runs[1].kwargs["id"] == run.kwargs["id"]
  _log(tmp_path / "other", 0, [1], wandb=settings)
  assert runs[2].kwargs["id"] != run.kwargs["id"]


def test_disabled_wandb_is_never_imported(tmp_path, monkeypatch):
  calls, runs = _fake_wandb(monkeypatch)
  _log(tmp_path / "d", 0, [1], wandb={"enabled": False, "project": "p"})
  _log(tmp_path / "e", 0, [1])
  assert not runs and not calls
