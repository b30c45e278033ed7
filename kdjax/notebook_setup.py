"""A notebook's first cell: install what kdjax needs, never replacing a JAX that is already there.

A Colab TPU or GPU runtime comes with JAX built for its accelerator (jax, jaxlib and libtpu or
the CUDA plugin, at versions that match each other). `pip install -r requirements.txt` would
pin the CPU build's jax and jaxlib over them and can leave JAX without its TPU or GPU backend.
So, where JAX is installed, kdjax's other pinned dependencies are installed with the present
JAX distributions held at their versions (a pip constraints file), and the pinned CPU JAX of
requirements.txt only where there is no JAX at all. Nothing is installed where every pin is
met already (a venv made from requirements.txt, as in the tests). kdjax itself imports from the
clone: the notebook's working directory.

Standard library only: it runs before anything else is installed (kdjax/__init__.py imports
nothing either).

  from kdjax import notebook_setup
  notebook_setup.install(ROOT)   # ROOT: the kdjax clone
  print(notebook_setup.describe())
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile

# The JAX distributions an accelerator runtime brings, held at their installed versions.
JAX_DISTRIBUTIONS = ("jax", "jaxlib", "libtpu", "libtpu-nightly", "jax-cuda12-plugin",
                     "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt",
                     "jax-rocm7-plugin", "jax-rocm7-pjrt")
# The oldest JAX kdjax runs on (pyproject.toml; the pinned flax needs it too), checked by
# tests/test_notebook_setup.py on a JAX of that version.
JAX_FLOOR = "0.10.0"


def _version_tuple(version: str) -> tuple[int, ...]:
  return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def _name(requirement: str) -> str:
  """A requirements line's distribution name, normalised ('' for comments and options)."""
  line = requirement.split("#")[0].strip()
  if not line or line.startswith("-"):
    return ""
  return re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0].lower().replace("_", "-")


def installed(names) -> dict[str, str]:
  """{distribution: version} of those of `names` that are installed in this Python."""
  found = {}
  for name in names:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def pinned(root: str) -> dict[str, str]:
  """requirements.txt's pins, {distribution: version}."""
  pins = {}
  with open(os.path.join(root, "requirements.txt")) as f:
    for line in f:
      if name := _name(line):
        pins[name] = line.split("#")[0].split("==")[1].strip()
  return pins


def plan(root: str, python: str = sys.executable, workdir: str | None = None) -> list[list[str]]:
  """The pip commands that bring this Python to kdjax's pins ([] if nothing is missing).

  With JAX present, the requirements other than jax and jaxlib, under a constraints file that
  holds every installed JAX distribution (`workdir` receives both files); without JAX,
  requirements.txt as it is. Raises RuntimeError for a JAX older than JAX_FLOOR: pip would
  otherwise have to replace it.
  """
  pins = pinned(root)
  jax_present = installed(JAX_DISTRIBUTIONS)
  have = installed(name for name in pins if name not in JAX_DISTRIBUTIONS)
  missing = {n: v for n, v in pins.items() if n not in JAX_DISTRIBUTIONS and have.get(n) != v}
  pip = [python, "-m", "pip", "install", "-q"]
  if "jax" not in jax_present:
    return [pip + ["-r", os.path.join(root, "requirements.txt")]]
  if _version_tuple(jax_present["jax"]) < _version_tuple(JAX_FLOOR):
    raise RuntimeError(
        f"This runtime's jax {jax_present['jax']} is older than kdjax needs (>= {JAX_FLOOR}); "
        f"upgrade it together with its accelerator package, e.g. pip install -U "
        f"'jax[tpu]=={pins['jax']}' (TPU) or 'jax[cuda12]=={pins['jax']}' (GPU), then restart "
        "the runtime and run this cell again.")
  if not missing:
    return []
  workdir = workdir or tempfile.mkdtemp(prefix="kdjax-install-")
  requirements = os.path.join(workdir, "requirements-without-jax.txt")
  constraints = os.path.join(workdir, "constraints-installed-jax.txt")
  with open(requirements, "w") as f:
    f.writelines(f"{n}=={v}\n" for n, v in pins.items() if n not in JAX_DISTRIBUTIONS)
  with open(constraints, "w") as f:
    f.writelines(f"{n}=={v}\n" for n, v in jax_present.items())
  return [pip + ["-r", requirements, "-c", constraints]]


def install(root: str) -> list[list[str]]:
  """Runs `plan(root)`, printing what it keeps and what it installs; returns the commands run."""
  kept = installed(JAX_DISTRIBUTIONS)
  commands = plan(root)
  if kept:
    print("Keeping this runtime's JAX: " + ", ".join(f"{n} {v}" for n, v in kept.items()))
  else:
    print("No JAX here: installing the pinned CPU build (requirements.txt).")
  for command in commands:
    print("$ " + " ".join(command[2:]), flush=True)
    subprocess.check_call(command)
  if not commands:
    print("kdjax's dependencies are already installed.")
  return commands


def describe() -> str:
  """Which JAX, backend and devices this notebook will use (imports JAX)."""
  import jax  # only now: install() may have just put it there
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  return (f"JAX {jax.__version__} (jaxlib {importlib.metadata.version('jaxlib')}), backend "
          f"'{jax.default_backend()}': {len(devices)} device(s), {', '.join(kinds)}")
