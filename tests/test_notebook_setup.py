"""kdjax.notebook_setup: a notebook's install never replaces a JAX that is already there.

The plans are checked against requirements.txt itself, in a simulated environment; then a real
venv with another JAX version installed first runs the notebook's own setup cell (slow)."""

import json
import os
import subprocess
import sys

import nbformat
import pytest

from kdjax import notebook_setup
from support.notebook_runner import ROOT

PINS = notebook_setup.pinned(ROOT)


def _environment(monkeypatch, present: dict[str, str]):
  """This Python, as notebook_setup sees it, holds exactly the `present` distributions."""
  monkeypatch.setattr(notebook_setup, "installed",
                      lambda names: {n: present[n] for n in names if n in present})


def _read(path):
  with open(path) as f:
    return sorted(line.strip() for line in f if line.strip())


def test_pins_are_read_from_requirements_txt():
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    lines = [l.split("#")[0].strip() for l in f if l.split("#")[0].strip()]
  assert len(PINS) == len(lines) and PINS["jax"] == PINS["jaxlib"]
  assert PINS["flax"] in {l.split("==")[1] for l in lines if l.startswith("flax==")}
  assert PINS["orbax-checkpoint"] and PINS["importlib-resources"]  # names normalised


def test_without_jax_the_pinned_cpu_jax_is_installed(monkeypatch):
  _environment(monkeypatch, {})
  (command,) = notebook_setup.plan(ROOT, python="py")
  assert command == ["py", "-m", "pip", "install", "-q", "-r",
                     os.path.join(ROOT, "requirements.txt")]


def test_an_accelerator_jax_is_held_at_its_versions(monkeypatch, tmp_path):
  runtime = {"jax": "0.10.1", "jaxlib": "0.10.1", "libtpu": "0.0.40", "numpy": PINS["numpy"]}
  _environment(monkeypatch, runtime)
  (command,) = notebook_setup.plan(ROOT, python="py", workdir=str(tmp_path))
  requirements = command[command.index("-r") + 1]
  constraints = command[command.index("-c") + 1]
  # Every pin but jax and jaxlib is asked for; the runtime's JAX distributions are constraints.
  assert _read(requirements) == sorted(f"{n}=={v}" for n, v in PINS.items()
                                       if n not in ("jax", "jaxlib"))
  assert _read(constraints) == ["jax==0.10.1", "jaxlib==0.10.1", "libtpu==0.0.40"]


def test_nothing_is_installed_where_every_pin_is_met(monkeypatch):
  _environment(monkeypatch, {**PINS, "jax": "0.10.1", "jaxlib": "0.10.1"})  # any JAX >= floor
  assert notebook_setup.plan(ROOT) == []
  _environment(monkeypatch, {**PINS, "flax": "0.10.4"})  # a runtime's older flax is replaced
  (command,) = notebook_setup.plan(ROOT)
  assert "-c" in command


def test_a_jax_older_than_the_floor_is_named_with_the_fix(monkeypatch):
  _environment(monkeypatch, {"jax": "0.7.2", "jaxlib": "0.7.2", "libtpu": "0.0.17"})
  with pytest.raises(RuntimeError, match=r"jax 0\.7\.2 is older than kdjax needs \(>= 0\.10\.0\)"
                     r".*jax\[tpu\]==0\.10\.2.*restart"):
    notebook_setup.plan(ROOT)


def _setup_cell(name: str) -> str:
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  return next(c.source for c in nb.cells if c.cell_type == "code")


def test_every_notebook_installs_through_notebook_setup():
  for name in ("quickstart.ipynb", "ablations.ipynb", "tpu_colab.ipynb"):
    cell = _setup_cell(name)
    assert "notebook_setup.install(ROOT)" in cell and "requirements.txt" not in cell, name


@pytest.mark.slow
def test_the_setup_cell_keeps_a_jax_that_is_already_installed(tmp_path):
  """A venv with JAX at another version than requirements.txt's (the oldest kdjax supports)
  runs the TPU notebook's setup cell: JAX keeps its version and backend, the other pins arrive,
  and a distillation step runs on that JAX."""
  floor = notebook_setup.JAX_FLOOR
  assert floor != PINS["jax"]
  python = str(tmp_path / "venv" / "bin" / "python")
  subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
  subprocess.run([python, "-m", "pip", "install", "-q", f"jax=={floor}", f"jaxlib=={floor}"],
                 check=True, timeout=900)
  probe = ("import importlib.metadata as m, jax; print(json.dumps([jax.__version__, "
           "m.version('jaxlib'), jax.default_backend()]))")
  # The venv's own Python and JAX as a user's runtime has them: none of the test run's settings.
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "XLA_FLAGS", "JAX_PLATFORMS")}

  def run(*args, **kwargs):
    out = subprocess.run([python, *args], capture_output=True, text=True, env=env, timeout=1200,
                         **kwargs)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout

  before = json.loads(run("-c", "import json; " + probe).splitlines()[-1])
  assert before == [floor, floor, "cpu"]
  cell = run("-c", _setup_cell("tpu_colab.ipynb"), cwd=os.path.join(ROOT, "notebooks"))
  assert f"Keeping this runtime's JAX: jax {floor}, jaxlib {floor}" in cell
  assert f"JAX {floor} (jaxlib {floor}), backend 'cpu'" in cell
  after = json.loads(run("-c", "import json, flax, grain; " + probe).splitlines()[-1])
  assert after == before
  # The pins other than JAX's are what requirements.txt says.
  versions = json.loads(run("-c", "import importlib.metadata as m, json; print(json.dumps("
                                  "{n: m.version(n) for n in ('flax', 'optax', 'grain')}))"))
  assert versions == {n: PINS[n] for n in ("flax", "optax", "grain")}
  # kdjax's distillation step on that JAX (random tokens, no data).
  env["PYTHONPATH"] = ROOT
  step = run("scripts/benchmark.py", "--config=configs/shakespeare.py:smoke", "--steps=1",
             "--warmup=0", cwd=ROOT)
  row = json.loads(step.strip().splitlines()[0])
  assert row["impl"] == "kdjax" and row["tokens_per_sec"] > 0 and 0 < row["loss"] < 20
