"""Shared test settings: strict rank promotion and a CPU backend, as DESIGN.md asks."""
import importlib
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

importlib.import_module("kdjax")  # sets kdjax's XLA flags before JAX starts its backend
import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

_BACKGROUND = pytest.StashKey()


def pytest_collection_finish(session):
  """Starts a module's slow background worker (a module-level `WORKER` with `start` and `stop`,
  used through a fixture named `worker`) as soon as the tests to run are known, so that it runs
  beside the tests collected before that module's instead of after them."""
  if session.config.option.collectonly:
    return
  for item in session.items:
    background = getattr(getattr(item, "module", None), "WORKER", None)
    if background is not None and "worker" in getattr(item, "fixturenames", ()):
      background.start()
      session.config.stash.setdefault(_BACKGROUND, set()).add(background)


def pytest_sessionfinish(session):
  for background in session.config.stash.get(_BACKGROUND, ()):
    background.stop()  # in case its tests did not run to the end (-x, Ctrl-C)

