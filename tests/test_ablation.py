"""Ablation sweeps (kdjax/ablation.py, scripts/ablate.py) and their plots (kdjax/plots.py)."""

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from configs import shakespeare
from kdjax import ablation, config_check, plots

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
  assert keys["T1_a0.5"] == keys["forward_kl"] == "distilled-base"
  if preset == "ablate":
    assert keys["m_distilled"] == keys["steps150_distilled"] == "distilled-base"
    assert {p.group for p in points} == {"temperature_alpha", "divergence", "student_size",
                                         "data_budget"}
    groups = [p.group for p in points]
    assert groups.count("divergence") == 6 and groups.count("temperature_alpha") == 13
  for p in points:  # overrides land where they say, and nothing else changes
    c = ablation.point_config(config, p, "/t")
    flat, base = config_check.flatten(c), config_check.flatten(config)
    for k, v in p.overrides:
      assert flat[k] == v
    changed = {k for k in flat if k in base and flat[k] != base[k]} - {"sweep", "mode",
                                                                        "teacher_checkpoint"}
    assert changed <= set(p.overrides_dict), (p.name, changed)
    assert c.teacher_checkpoint == "/t" and c.sweep == []


def test_a_bad_point_is_named():
  config = shakespeare.get_config("ablate_smoke")
  config.sweep = [dict(name="x", group="g", phase="distilled",
                       overrides={"distill.temprature": 2.0})]
  with pytest.raises(config_check.ConfigError, match="point 'x'.*distill.temprature"):
    ablation.Runner(config, "/nowhere").check()
  config.sweep = [dict(name="x", group="g", phase="teacher", overrides={})]
  with pytest.raises(config_check.ConfigError, match=r"config.sweep\[0\].phase"):
    ablation.points(config)


_SMALL_SWEEP = """
from configs import shakespeare

def get_config(arg=None):
  config = shakespeare.get_config("ablate_smoke")
  keep = ("T1_a1", "tvd", "steps15_scratch", "s_distilled")
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
  """Done when: the script writes results.csv and plots; rerunning gives an identical
  results.csv. Two of four points are deleted and recomputed: their rows must come back bit for
  bit (same seed, same batches, deterministic CPU), and the finished ones are skipped."""
  config_path, workdir = small_sweep
  first = (workdir / "results.csv").read_bytes()
  rows = list(csv.DictReader(first.decode().splitlines()))
  assert [r["name"] for r in rows] == ["T1_a1", "tvd", "s_distilled", "steps15_scratch"]
  assert all(float(r["ppl"]) > 1 and 0 <= float(r["top1_agreement"]) <= 1 for r in rows)
  assert json.loads(rows[0]["overrides"]) == {"distill.alpha": 1.0, "distill.temperature": 1.0}
  small = next(r for r in rows if r["name"] == "s_distilled")
  assert int(small["params"]) < int(rows[0]["params"])
  for name in ("ppl_by_divergence.png", "student_size.png", "data_budget.png",
               "curves_teacher.png", "curves_divergence.png"):
    with open(workdir / "plots" / name, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  assert "| tvd | distilled |" in (workdir / "results.md").read_text()

  runs = sorted(os.listdir(workdir / "points"))
  for run in runs[:2]:
    shutil.rmtree(workdir / "points" / run)
  out = _ablate(config_path, workdir)
  assert out.stderr.count("finished, skipped") == 2
  assert (workdir / "results.csv").read_bytes() == first


def test_plots_from_rows(tmp_path):
  rows = [dict(name=f"T{t}_a{a}", group="temperature_alpha", phase="distilled", ppl=100 + t + a,
               overrides=json.dumps({"distill.temperature": t, "distill.alpha": a}),
               params=10, train_tokens=100)
          for t in (1.0, 2.0) for a in (0.5, 1.0)]
  rows.append(dict(name="alpha0", group="temperature_alpha", phase="distilled", ppl=150,
                   overrides=json.dumps({"distill.alpha": 0.0}), params=10, train_tokens=100))
  written = plots.sweep_plots(rows, str(tmp_path))
  assert [os.path.basename(p) for p in written] == ["ppl_vs_temperature.png"]
  assert os.path.getsize(written[0]) > 1000


@pytest.mark.slow
def test_the_ablations_notebook_executes_on_a_sweeps_results(small_sweep, monkeypatch):
  """notebooks/ablations.ipynb, top to bottom, on the sweep above (its own fallback sweep is the
  same code, ablation.Runner)."""
  from support.notebook_runner import execute
  monkeypatch.setenv("KDJAX_ABLATION_DIR", str(small_sweep[1]))
  outputs = execute("ablations.ipynb")
  assert "lowest held-out perplexity" in outputs
  assert "image/png" in outputs
