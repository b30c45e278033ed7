"""Shared test settings: strict rank promotion and a CPU backend, as DESIGN.md asks."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import kdjax  # noqa: E402,F401  (sets kdjax's XLA flags before JAX starts its backend)
import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
