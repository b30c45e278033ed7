"""kdjax.notebook_setup: a notebook's install never replaces a JAX that is already there.

The plans are checked against requirements.txt itself, in a simulated environment; then a real
venv with another JAX version installed first runs the notebook's own setup cell (slow)."""

import json
import os
import subprocess
import sys
import types

import nbformat
import pytest

from kdjax import notebook_setup
from support.notebook_runner import ROOT


def _requirements_txt() -> dict[str, str]:
  """requirements.txt read here, independently of notebook_setup: {name: pinned version}."""
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    pins = [l.split("#")[0].strip() for l in f if l.split("#")[0].strip()]
  return {name.lower().replace("_", "-"): version
          for name, version in (p.split("==") for p in pins)}


PINS = _requirements_txt()


def _environment(monkeypatch, present: dict[str, str]):
  """This Python, as notebook_setup sees it, holds exactly the `present` distributions."""
  monkeypatch.setattr(notebook_setup, "installed",
                      lambda names: {n: present[n] for n in names if n in present})


def _read(path):
  with open(path) as f:
    return sorted(line.strip() for line in f if line.strip())


def _pins_without(*names):
  return sorted(f"{n}=={v}" for n, v in PINS.items() if n not in names)


def test_pins_and_floors_are_read_from_the_project_files():
  assert notebook_setup.pinned(ROOT) == PINS
  oldest = notebook_setup.floors(ROOT)
  assert oldest["jax"] == notebook_setup.JAX_FLOOR == "0.10.0"
  assert oldest["flax"] == "0.12.8" and oldest["importlib-resources"] == "7.1.0"


def test_a_requirement_that_is_not_a_pin_is_named_with_its_line(tmp_path):
  (tmp_path / "requirements.txt").write_text("# kdjax\nflax==0.12.8\noptax>=0.2\n")
  with pytest.raises(ValueError, match=r"requirements\.txt:3: 'optax>=0\.2' is not a "
                                       r"'name==version' pin"):
    notebook_setup.pinned(str(tmp_path))


def test_without_jax_the_pinned_cpu_jax_is_installed(monkeypatch):
  _environment(monkeypatch, {})
  (command,) = notebook_setup.plan(ROOT, python="py")
  assert command == ["py", "-m", "pip", "install", "-q", "-r",
                     os.path.join(ROOT, "requirements.txt")]


def test_an_accelerator_jax_is_held_and_the_runtimes_newer_packages_stay(monkeypatch, tmp_path):
  runtime = {"jax": "0.10.1", "jaxlib": "0.10.1", "libtpu": "0.0.40",
             "numpy": "2.9.0",  # newer than kdjax's floor: kept
             "flax": "0.10.4"}  # older than kdjax's floor (0.12.8): replaced by the pin
  _environment(monkeypatch, runtime)
  (command,) = notebook_setup.plan(ROOT, python="py", workdir=str(tmp_path))
  requirements = command[command.index("-r") + 1]
  constraints = command[command.index("-c") + 1]
  assert _read(requirements) == _pins_without("jax", "jaxlib", "numpy")
  assert f"flax=={PINS['flax']}" in _read(requirements)
  assert _read(constraints) == ["jax==0.10.1", "jaxlib==0.10.1", "libtpu==0.0.40"]


def test_jax_without_jaxlib_gets_its_own_jaxlib(monkeypatch, tmp_path):
  _environment(monkeypatch, {"jax": "0.10.1"})
  (command,) = notebook_setup.plan(ROOT, python="py", workdir=str(tmp_path))
  assert "jaxlib==0.10.1" in _read(command[command.index("-r") + 1])
  assert _read(command[command.index("-c") + 1]) == ["jax==0.10.1", "jaxlib==0.10.1"]


def test_nothing_is_installed_where_every_requirement_is_met(monkeypatch):
  _environment(monkeypatch, {**PINS, "jax": "0.10.1", "jaxlib": "0.10.1", "numpy": "2.9.0"})
  assert notebook_setup.plan(ROOT) == []


def test_a_jax_older_than_the_floor_is_named_with_the_fix(monkeypatch):
  _environment(monkeypatch, {"jax": "0.7.2", "jaxlib": "0.7.2", "libtpu": "0.0.17"})
  with pytest.raises(RuntimeError, match=r"jax 0\.7\.2 is older than kdjax needs \(>= 0\.10\.0\)"
                     r".*jax\[tpu\]==0\.10\.2.*restart"):
    notebook_setup.plan(ROOT)


def test_an_accelerator_package_without_jax_is_not_paired_with_the_cpu_jax(monkeypatch):
  _environment(monkeypatch, {"libtpu": "0.0.40"})
  with pytest.raises(RuntimeError, match=r"libtpu 0\.0\.40 is installed without jax"):
    notebook_setup.plan(ROOT)


def test_install_says_to_restart_when_an_imported_package_was_replaced(monkeypatch, capsys):
  import numpy  # noqa: F401  (imported: replacing it needs a restart)
  _environment(monkeypatch, {**PINS, "jax": "0.10.1", "jaxlib": "0.10.1", "numpy": "1.26.4"})
  ran = []
  monkeypatch.setattr(notebook_setup.subprocess, "check_call", ran.append)
  notebook_setup.install(ROOT)
  out = capsys.readouterr().out
  (command,) = ran
  assert command[:3] == [sys.executable, "-m", "pip"] and "-c" in command
  assert "Keeping this runtime's JAX: jax 0.10.1, jaxlib 0.10.1" in out
  assert "Replaced: numpy 1.26.4" in out and "numpy was imported before the upgrade" in out


def test_run_dirs_outside_colab_are_the_clones(monkeypatch):
  monkeypatch.setitem(sys.modules, "google.colab", None)  # import fails, as outside Colab
  assert notebook_setup.run_dirs("colab_smoke", "/repo") == ("/repo/runs/colab_smoke", "")


def test_run_dirs_in_colab_keep_the_run_and_tokenizers_on_drive(monkeypatch, tmp_path):
  drive_root, home = tmp_path / "drive", tmp_path / "home"
  mounted = []
  drive = types.SimpleNamespace(mount=lambda path: mounted.append(path))
  monkeypatch.setitem(sys.modules, "google.colab", types.SimpleNamespace(drive=drive))
  monkeypatch.setenv("HOME", str(home))
  # A tokenizer trained on this VM before, and another that Drive holds already under that name.
  local = home / "tensorflow_datasets" / "tokenizers"
  local.mkdir(parents=True)
  (local / "lm1b_bpe32768.model").write_text("trained here")
  (local / "old.model").write_text("trained here too")
  on_drive = drive_root / "MyDrive" / "kdjax" / "tokenizers"
  on_drive.mkdir(parents=True)
  (on_drive / "old.model").write_text("the checkpoints' own")
  workdir, data_dir = notebook_setup.run_dirs("colab_tpu", "/repo", str(drive_root))
  assert mounted == [str(drive_root)]
  assert workdir == str(drive_root / "MyDrive" / "kdjax" / "colab_tpu")
  assert data_dir == str(home / "tensorflow_datasets")  # the data stay on the VM's disk
  assert os.path.realpath(local) == str(on_drive)
  assert (on_drive / "lm1b_bpe32768.model").read_text() == "trained here"
  assert (on_drive / "old.model").read_text() == "the checkpoints' own"
  # A second call (a restarted session) finds the link in place.
  assert notebook_setup.run_dirs("colab_tpu", "/repo", str(drive_root))[1] == data_dir


def _setup_cell(name: str) -> str:
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  return next(c.source for c in nb.cells if c.cell_type == "code")


def test_every_notebook_installs_through_notebook_setup():
  for name in ("quickstart.ipynb", "ablations.ipynb", "tpu_colab.ipynb"):
    cell = _setup_cell(name)
    assert "notebook_setup.install(ROOT)" in cell and "requirements.txt" not in cell, name


@pytest.mark.slow
def test_the_setup_cell_keeps_a_jax_that_is_already_installed(tmp_path):
  """A venv with JAX and its CUDA plugin at another version than requirements.txt's (the oldest
  kdjax supports) runs the TPU notebook's setup cell: the JAX distributions keep their versions
  and JAX its backend (CPU here: no GPU), the other pins arrive, and a distillation step runs on
  that JAX. Installing requirements.txt instead would move jax and jaxlib to its pins."""
  floor = notebook_setup.JAX_FLOOR
  assert floor != PINS["jax"]
  runtime = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt")
  python = str(tmp_path / "venv" / "bin" / "python")
  subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
  subprocess.run([python, "-m", "pip", "install", "-q", *(f"{n}=={floor}" for n in runtime)],
                 check=True, timeout=900)
  probe = ("import importlib.metadata as m, json, jax; print(json.dumps([jax.default_backend()] "
           f"+ [m.version(n) for n in {runtime!r}]))")
  # The venv's own Python and JAX as a user's runtime has them: none of the test run's settings.
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "XLA_FLAGS", "JAX_PLATFORMS")}

  def run(*args, **kwargs):
    out = subprocess.run([python, *args], capture_output=True, text=True, env=env, timeout=1200,
                         **kwargs)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout

  before = json.loads(run("-c", probe).splitlines()[-1])
  assert before == ["cpu"] + [floor] * 4
  cell = run("-c", _setup_cell("tpu_colab.ipynb"), cwd=os.path.join(ROOT, "notebooks"))
  assert ("Keeping this runtime's JAX: " + ", ".join(f"{n} {floor}" for n in runtime)) in cell
  assert f"JAX {floor} (jaxlib {floor}), backend 'cpu'" in cell
  assert json.loads(run("-c", "import flax, grain; " + probe).splitlines()[-1]) == before
  # The pins other than JAX's are what requirements.txt says (none was in the venv).
  versions = json.loads(run("-c", "import importlib.metadata as m, json; print(json.dumps("
                                  "{n: m.version(n) for n in ('flax', 'optax', 'grain')}))"))
  assert versions == {n: PINS[n] for n in ("flax", "optax", "grain")}
  # kdjax's distillation step on that JAX (random tokens, no data).
  env["PYTHONPATH"] = ROOT
  step = run("scripts/benchmark.py", "--config=configs/shakespeare.py:smoke", "--steps=1",
             "--warmup=0", cwd=ROOT)
  row = json.loads(step.strip().splitlines()[0])
  assert row["impl"] == "kdjax" and row["tokens_per_sec"] > 0 and 0 < row["loss"] < 20
