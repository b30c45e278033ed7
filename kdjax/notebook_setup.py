"""A notebook's first cell: install what kdjax needs, never replacing a JAX that is already there.

A Colab TPU or GPU runtime comes with JAX built for its accelerator (jax, jaxlib and libtpu or
the CUDA plugin, at versions that match each other). `pip install -r requirements.txt` would
pin the CPU build's jax and jaxlib over them and can leave JAX without its TPU or GPU backend.
So, where JAX is installed:

- every JAX distribution present is held at its version (a pip constraints file);
- of requirements.txt's other pins, only those missing, or older than pyproject.toml's floor, are
  installed (at the pinned version): a runtime's own numpy or protobuf that kdjax accepts stays;
- a JAX older than JAX_FLOOR stops the cell with the command that upgrades it together with its
  accelerator package.

The pinned CPU JAX of requirements.txt is installed only where there is no JAX at all, and
nothing where every requirement is met (a venv made from requirements.txt, as in the tests).
kdjax itself imports from the clone: the notebook's working directory.

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
import shutil
import subprocess
import sys
import tempfile
import tomllib

# The JAX distributions an accelerator runtime brings, held at their installed versions.
JAX_DISTRIBUTIONS = ("jax", "jaxlib", "libtpu", "libtpu-nightly", "jax-cuda12-plugin",
                     "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt",
                     "jax-rocm7-plugin", "jax-rocm7-pjrt")
# The oldest JAX kdjax runs on (pyproject.toml's floor; the pinned flax needs it too), checked by
# tests/test_notebook_setup.py, which runs a distillation step on a JAX of that version.
JAX_FLOOR = "0.10.0"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)$")


def _normal(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _version_tuple(version: str) -> tuple[int, ...]:
  """'0.10' -> (0, 10, 0); '2.4.6rc1' -> (2, 4, 6): enough to compare against a floor."""
  numbers = [int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3]]
  return tuple(numbers + [0] * (3 - len(numbers)))


def pinned(root: str) -> dict[str, str]:
  """requirements.txt's pins, {normalised distribution name: version}."""
  path = os.path.join(root, "requirements.txt")
  pins = {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      line = line.split("#")[0].strip()
      if not line:
        continue
      if not (match := _PIN.match(line)):
        raise ValueError(f"{path}:{number}: {line!r} is not a 'name==version' pin, which "
                         "kdjax.notebook_setup reads; pin it exactly.")
      pins[_normal(match[1])] = match[2]
  return pins


def floors(root: str) -> dict[str, str]:
  """pyproject.toml's `name>=version` dependencies: the oldest version kdjax accepts of each."""
  with open(os.path.join(root, "pyproject.toml"), "rb") as f:
    dependencies = tomllib.load(f)["project"]["dependencies"]
  found = {}
  for dependency in dependencies:
    if match := re.match(r"^([A-Za-z0-9._-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)$", dependency.strip()):
      found[_normal(match[1])] = match[2]
  return found


def installed(names) -> dict[str, str]:
  """{distribution: version} of those of `names` that are installed in this Python."""
  found = {}
  for name in names:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def to_install(root: str) -> dict[str, str]:
  """The non-JAX pins to install: missing here, or here at a version below pyproject's floor."""
  pins, oldest = pinned(root), floors(root)
  wanted = {n: v for n, v in pins.items() if n not in JAX_DISTRIBUTIONS}
  have = installed(wanted)
  return {n: v for n, v in wanted.items()
          if n not in have or _version_tuple(have[n]) < _version_tuple(oldest.get(n, "0"))}


def plan(root: str, python: str = sys.executable, workdir: str | None = None) -> list[list[str]]:
  """The pip commands that give this Python what kdjax needs ([] where nothing is missing).

  Without JAX: requirements.txt as it is. With JAX: `to_install` (and jaxlib at jax's version if
  only jax is there) under a constraints file holding every JAX distribution present; both files
  go to `workdir`. Raises RuntimeError, in one line with the fix, for a JAX older than JAX_FLOOR
  or an accelerator package without jax.
  """
  present = installed(JAX_DISTRIBUTIONS)
  pip = [python, "-m", "pip", "install", "-q"]
  if "jax" not in present:
    if present:  # libtpu or a CUDA plugin alone: the CPU jax would not match it
      name, version = next(iter(present.items()))
      raise RuntimeError(f"{name} {version} is installed without jax; install the jax that "
                         f"matches it (e.g. pip install 'jax[tpu]' or 'jax[cuda12]'), then run "
                         "this cell again.")
    return [pip + ["-r", os.path.join(root, "requirements.txt")]]
  if _version_tuple(present["jax"]) < _version_tuple(JAX_FLOOR):
    pin = pinned(root)["jax"]
    raise RuntimeError(
        f"This runtime's jax {present['jax']} is older than kdjax needs (>= {JAX_FLOOR}); "
        f"upgrade it together with its accelerator package, e.g. pip install -U "
        f"'jax[tpu]=={pin}' (TPU) or 'jax[cuda12]=={pin}' (GPU), then restart the runtime "
        "and run this cell again.")
  held = dict(present)
  wanted = to_install(root)
  if "jaxlib" not in held:  # jax alone: its own jaxlib, not whatever a dependency would pull
    held["jaxlib"] = wanted["jaxlib"] = present["jax"]
  if not wanted:
    return []
  workdir = workdir or tempfile.mkdtemp(prefix="kdjax-install-")
  requirements = os.path.join(workdir, "requirements-without-jax.txt")
  constraints = os.path.join(workdir, "constraints-installed-jax.txt")
  with open(requirements, "w") as f:
    f.writelines(f"{n}=={v}\n" for n, v in wanted.items())
  with open(constraints, "w") as f:
    f.writelines(f"{n}=={v}\n" for n, v in held.items())
  return [pip + ["-r", requirements, "-c", constraints]]


def install(root: str) -> list[list[str]]:
  """Runs `plan(root)`, printing what it keeps, installs and replaces; returns the commands run.

  Where a distribution that was here is replaced (below kdjax's floor; or, without JAX, not at
  requirements.txt's pin) and one of its modules was imported already, it says to restart.
  """
  kept = installed(JAX_DISTRIBUTIONS)
  if "jax" in kept:
    replaced = installed(to_install(root))
  else:
    pins = pinned(root)
    replaced = {n: v for n, v in installed(pins).items() if v != pins[n]}
  with tempfile.TemporaryDirectory(prefix="kdjax-install-") as workdir:
    commands = plan(root, workdir=workdir)
    if "jax" in kept:
      print("Keeping this runtime's JAX: " + ", ".join(f"{n} {v}" for n, v in kept.items()))
    else:
      print("No JAX here: installing the pinned CPU build (requirements.txt).")
    for command in commands:
      print("$ " + " ".join(command[2:]), flush=True)
      subprocess.check_call(command)
  if not commands:
    print("kdjax's dependencies are already installed.")
  if replaced:
    print("Replaced: " + ", ".join(f"{n} {v}" for n, v in replaced.items()))
    if loaded := _imported(replaced):
      print(f"{', '.join(loaded)} was imported before the upgrade: restart the runtime "
            "(Runtime > Restart session) and run the cells again.")
  return commands


def _imported(distributions) -> list[str]:
  """The modules of `distributions` that this process has imported already."""
  wanted = set(distributions)
  return sorted(module for module, dists in importlib.metadata.packages_distributions().items()
                if module in sys.modules and wanted & {_normal(d) for d in dists})


def run_dirs(run: str, root: str, drive_root: str = "/content/drive") -> tuple[str, str]:
  """(workdir, data_dir) of a notebook's run.

  In Colab (google.colab imports), Drive is mounted at `drive_root` and the workdir is
  MyDrive/kdjax/<run>: checkpoints, metrics and TensorBoard events outlive the VM. The data stay
  on the VM's disk (~/tensorflow_datasets; TFDS reads them at random, slowly through Drive) and
  are prepared again on a new VM, but their `tokenizers` folder is a link to MyDrive/kdjax/
  tokenizers: a resumed run reads the tokenizer its checkpoints were trained with.
  Elsewhere: <root>/runs/<run> and the default data_dir ('').
  """
  try:
    from google.colab import drive
  except ImportError:
    return os.path.join(root, "runs", run), ""
  drive.mount(drive_root)
  base = os.path.join(drive_root, "MyDrive", "kdjax")
  tokenizers = os.path.join(base, "tokenizers")
  data_dir = os.path.expanduser("~/tensorflow_datasets")
  os.makedirs(tokenizers, exist_ok=True)
  os.makedirs(data_dir, exist_ok=True)
  link = os.path.join(data_dir, "tokenizers")
  if os.path.isdir(link) and not os.path.islink(link):  # trained on this VM before the link
    for name in os.listdir(link):  # Drive's copy wins: its checkpoints were trained with it
      src, dst = os.path.join(link, name), os.path.join(tokenizers, name)
      if not os.path.exists(dst):
        (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, dst)
    shutil.rmtree(link)
  if not os.path.islink(link):
    os.symlink(tokenizers, link)
  return os.path.join(base, run), data_dir


def describe() -> str:
  """Which JAX, backend and devices this notebook will use (imports JAX)."""
  import jax  # only now: install() may have just put it there
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  return (f"JAX {jax.__version__} (jaxlib {importlib.metadata.version('jaxlib')}), backend "
          f"'{jax.default_backend()}': {len(devices)} device(s), {', '.join(kinds)}")
