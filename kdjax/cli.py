"""What the command-line entry points (kdjax.main, scripts/*.py) and config files share.

A command-line error is one line on stderr, `<prog>: error: <why and what to do>`, and exit
status 2, absl's and argparse's status for a usage error. Imports nothing heavy: main.py reports
flag errors before JAX starts.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from typing import NoReturn


def one_line(e: BaseException, limit: int | None = None) -> str:
  """`str(e)` with every run of whitespace (newlines included) made one space, cut to `limit`
  characters if given: exceptions from JAX, orbax or TFDS often span lines."""
  return " ".join(str(e).split())[:limit]


def fail(message: str, prog: str = "kdjax") -> NoReturn:
  """Prints `<prog>: error: <message>` to stderr and exits with status 2."""
  print(f"{prog}: error: {message}", file=sys.stderr)
  sys.exit(2)


def sibling_config(name: str, near: str) -> types.ModuleType:
  """The config file `<name>.py` in the folder of the file `near` (a config's `__file__`), loaded
  by path as `--config` loads a config, so configs build on each other from any directory and
  with kdjax installed as a package (configs/ is not one)."""
  path = os.path.join(os.path.dirname(os.path.abspath(near)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"kdjax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
