"""Shared test settings: strict rank promotion and a CPU backend, as DESIGN.md asks."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
