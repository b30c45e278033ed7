"""Ablation sweeps (kdjax/ablation.py, scripts/ablate.py) and their plots (kdjax/plots.py)."""

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import shakespeare
from kdjax import ablation, config_check

from support import scripts_loader
from support.background import Background

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("preset", ["ablate", "ablate_smoke"])
def test_every_provided_point_is_a_valid_config(preset):
  config = shakespeare.get_config(preset)
  runner = ablation.Runner(config, "/nonexistent/never-written")
  runner.check()  # builds and checks every point's config; writes nothing
  points = runner.points
  assert len({p.name for p in points}) == len(points)
  keys = {p.name: ablation.run_key(config, p) for p in points}
  # The baseline appears in several groups and runs once.
  default = config.distill
  base_name = f"{default.loss}_T{default.temperature:g}_a{default.alpha:g}"
  assert keys["cross_entropy"] == "scratch-base"
  # --index counts distinct runs, so processes given different indices never share a directory.
  distinct = [ablation.run_key(config, p) for p in runner.distinct_points()]
  assert distinct == list(dict.fromkeys(keys[p.name] for p in points))
  if preset == "ablate":
    assert keys[base_name] == keys["m_distilled"] == keys["steps150_distilled"] == "distilled-base"
    assert keys["cross_entropy"] == keys["steps150_scratch"] == "scratch-base"
    assert {p.group for p in points} == {"loss_temperature_alpha", "learning_rate", "student_size",
                                         "data_budget"}
    cross = [p.overrides_dict for p in points if p.group == "loss_temperature_alpha"
             and p.phase == "distilled"]
    assert len(cross) == 8 and len({json.dumps(o, sort_keys=True) for o in cross}) == 8
    assert {o["distill.loss"] for o in cross} == {"forward_kl", "reverse_kl"}
    assert runner.seeds == [0, 1, 2]
  for p in points:  # overrides land where they say, and nothing else changes
    c = ablation.point_config(config, p, "/t")
    flat, base = config_check.flatten(c), config_check.flatten(config)
    for k, v in p.overrides:
      assert flat[k] == v
    changed = {k for k in flat if k in base and flat[k] != base[k]} - {"sweep", "mode",
                                                                        "teacher_checkpoint"}
    assert changed <= set(p.overrides_dict), (p.name, changed)
    assert c.teacher_checkpoint == "/t" and c.sweep == []
    assert ablation.point_config(config, p, "/t", seed=7).seed == 7


def test_a_bad_point_is_named():
  config = shakespeare.get_config("ablate_smoke")
  config.sweep = [dict(name="x", group="g", phase="distilled",
                       overrides={"distill.temprature": 2.0})]
  with pytest.raises(config_check.ConfigError, match="point 'x'.*distill.temprature"):
    ablation.Runner(config, "/nowhere").check()
  config.sweep = [dict(name="x", group="g", phase="teacher", overrides={})]
  with pytest.raises(config_check.ConfigError, match=r"config.sweep\[0\].phase"):
    ablation.points(config)
  config.sweep = shakespeare.sweep(smoke=True)
  for bad in ([0, 0], [-1], []):
    with pytest.raises(config_check.ConfigError, match="--seeds"):
      ablation.Runner(config, "/nowhere", bad)


_SMALL_SWEEP = """
from configs import shakespeare

def get_config(arg=None):
  config = shakespeare.get_config("ablate_smoke")
  keep = ("forward_kl_T1_a1", "reverse_kl_T1_a0.5", "steps15_scratch", "s_distilled")
  config.sweep = [p for p in config.sweep if p["name"] in keep]
  return config
"""


def _command(config_path, workdir):
  return [sys.executable, os.path.join(ROOT, "scripts", "ablate.py"), f"--config={config_path}",
          f"--workdir={workdir}"]


def _ablate(config_path, workdir):
  out = subprocess.run(_command(config_path, workdir), capture_output=True, text=True, cwd=ROOT,
                       timeout=600, env=scripts_loader.subprocess_env())
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def _first_run(directory):
  config_path = os.path.join(directory, "small_sweep.py")
  with open(config_path, "w") as f:
    f.write(_SMALL_SWEEP)
  return _command(config_path, os.path.join(directory, "sweep")), scripts_loader.subprocess_env()


# The small sweep's first run starts in the background at collection (support/background.py).
WORKER = Background("kdjax_ablate_", _first_run, cwd=ROOT)


@pytest.fixture(scope="module")
def worker():
  directory = pathlib.Path(WORKER.wait())
  return directory / "small_sweep.py", directory / "sweep"


@pytest.fixture(scope="module")
def small_sweep(worker):
  """(config file, workdir) of four :ablate_smoke points run by the script once per session."""
  return worker


@pytest.mark.slow
def test_ablate_writes_tables_and_plots_and_a_rerun_gives_the_same_results(small_sweep):
  """Done when: a two-seed smoke sweep writes results.csv (one row per point and seed, validation
  and test metrics), results.md and plots; rerunning gives an identical results.csv. Runs are
  deleted in both seeds and recomputed: their rows must come back bit for bit (same seed, same
  batches, deterministic CPU), and the finished ones are skipped."""
  config_path, workdir = small_sweep
  first = (workdir / "results.csv").read_bytes()
  rows = list(csv.DictReader(first.decode().splitlines()))
  names = ["forward_kl_T1_a1", "reverse_kl_T1_a0.5", "s_distilled", "steps15_scratch"]
  assert [(r["name"], r["seed"]) for r in rows] == [(n, s) for n in names for s in ("0", "1")]
  for r in rows:
    for split in ("val", "test"):
      assert float(r[f"{split}_ppl"]) > 1 and 0 <= float(r[f"{split}_top1_agreement"]) <= 1
      np.testing.assert_allclose(float(r[f"{split}_ppl"]), np.exp(float(r[f"{split}_loss"])),
                                 rtol=1e-5)
    assert r["val_ppl"] != r["test_ppl"]  # two splits, two numbers
  by = {(r["name"], r["seed"]): r for r in rows}
  assert by["forward_kl_T1_a1", "0"]["test_ppl"] != by["forward_kl_T1_a1", "1"]["test_ppl"]
  assert json.loads(rows[0]["overrides"]) == {"distill.alpha": 1.0, "distill.loss": "forward_kl",
                                              "distill.temperature": 1.0}
  assert int(by["s_distilled", "0"]["params"]) < int(rows[0]["params"])
  for name in ("loss_temperature_alpha.png", "student_size.png", "data_budget.png",
               "curves_teacher.png", "curves_student_size.png"):
    with open(workdir / "plots" / name, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  md = (workdir / "results.md").read_text()
  assert "Seeds 0, 1" in md and md.count("★") >= 3  # one best point per group
  for seed in (0, 1):
    assert os.path.isdir(workdir / f"seed{seed}" / "teacher" / "checkpoints")

  for seed in (0, 1):
    runs = sorted(os.listdir(workdir / f"seed{seed}" / "points"))
    for run in runs[seed:seed + 2]:
      shutil.rmtree(workdir / f"seed{seed}" / "points" / run)
  out = _ablate(config_path, workdir)
  assert out.stderr.count("finished, skipped") == 4
  assert (workdir / "results.csv").read_bytes() == first
  assert (workdir / "results.md").read_text() == md
  # A report from one seed's process still covers every seed in the workdir.
  out = subprocess.run(_command(config_path, workdir) + ["--seeds=0", "--report_only"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env=scripts_loader.subprocess_env())
  assert out.returncode == 0, out.stderr[-3000:]
  assert (workdir / "results.csv").read_bytes() == first


@pytest.mark.slow
def test_the_ablations_notebook_executes_on_a_sweeps_results(small_sweep, monkeypatch):
  """notebooks/ablations.ipynb, top to bottom, on the sweep above (its own fallback sweep is the
  same code, ablation.Runner)."""
  from support.notebook_runner import execute
  monkeypatch.setenv("KDJAX_ABLATION_DIR", str(small_sweep[1]))
  outputs = execute("ablations.ipynb")
  assert "best by validation" in outputs
  assert "image/png" in outputs
