"""Shared test settings: strict rank promotion and a CPU backend, as DESIGN.md asks."""
import atexit
import importlib
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Both test workers may load libtpu to compile for a TPU target (tests/test_compile_for.py).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# One persistent compilation cache for the session, shared with every subprocess the tests start
# (they inherit the environment): the many runs of the same smoke steps compile once. It starts
# empty and is removed at exit, so no run depends on another session's executables.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="kdjax-test-xla-cache-")
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE_DIR,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

importlib.import_module("kdjax")  # sets kdjax's XLA flags before JAX starts its backend
import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

_BACKGROUND = pytest.StashKey()


def pytest_collection_finish(session):
  """Starts a module's slow background worker (a module-level `WORKER` with `start` and `stop`,
  used through a fixture named `worker`) as soon as the tests to run are known, so that it runs
  beside the tests collected before that module's instead of after them."""
  if session.config.option.collectonly or os.environ.get("PYTEST_XDIST_WORKER"):
    # Under xdist every worker collects every test but runs only its share: a module's worker
    # is then started by its fixture (Background.wait), in the one process that runs it.
    return
  for item in session.items:
    background = getattr(getattr(item, "module", None), "WORKER", None)
    if background is not None and "worker" in getattr(item, "fixturenames", ()):
      background.start()
      session.config.stash.setdefault(_BACKGROUND, set()).add(background)


def pytest_collection_modifyitems(config, items):
  """Tests marked `targets` (tens of minutes of the TPU compiler) run only when the -m
  expression names them: `pytest -m targets`. Deselected, not skipped, elsewhere."""
  if "targets" in (config.option.markexpr or ""):
    return
  kept = [item for item in items if item.get_closest_marker("targets") is None]
  if len(kept) < len(items):
    config.hook.pytest_deselected(items=[i for i in items if i not in kept])
    items[:] = kept


def pytest_sessionfinish(session):
  for background in session.config.stash.get(_BACKGROUND, ()):
    background.stop()  # in case its tests did not run to the end (-x, Ctrl-C)

