"""scripts/*.py as modules, each loaded once per test session: their absl flags may be defined
only once, and several test files call into the same script. `subprocess_env` runs them as
commands instead."""

import functools
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo


@functools.cache
def load(name: str):
  spec = importlib.util.spec_from_file_location(f"kdjax_script_{name}",
                                                os.path.join(ROOT, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def subprocess_env(**overrides: str) -> dict[str, str]:
  """This process's environment with the repo root first on PYTHONPATH, plus `overrides`: a
  script run as `python scripts/x.py` (or tests/support/mesh_worker.py) then imports kdjax, as it
  would after `pip install -e .`, and configs/."""
  path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  return dict(os.environ, PYTHONPATH=path, **overrides)
