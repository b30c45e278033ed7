"""kdjax turns off a CPU fusion that jaxlib 0.10.2 miscompiles; this pins that it stays off."""

import jax
import jax.numpy as jnp
import numpy as np


def test_fused_reduction_is_computed_correctly_past_2_to_the_15():
  # 86 x 24 x 16 = 33,024 elements: with the YNNPACK fusion on, slice 85 is off by ~45.
  rng = np.random.default_rng(0)
  a = rng.standard_normal((86, 24, 16)).astype(np.float32)
  b = rng.standard_normal((24, 16)).astype(np.float32)
  got = jax.jit(lambda a, b: a + b[None] * jnp.sum(b[None] * a, -1, keepdims=True))(a, b)
  want = a + b * (b * a).sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)

