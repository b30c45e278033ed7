"""scripts/*.py as modules, each loaded once per test session: their absl flags may be defined
only once, and several test files call into the same script."""

import functools
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def load(name: str):
  spec = importlib.util.spec_from_file_location(f"kdjax_script_{name}",
                                                os.path.join(ROOT, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
