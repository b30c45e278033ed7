"""kdjax: knowledge distillation of language models in JAX/Flax."""

import os as _os

# jaxlib 0.10.2's CPU backend miscompiles reductions and elementwise ops fused by YNNPACK: in
# `a + b * sum(b * a, -1)` every element past 2**15 comes out wrong (seen as gradients leaking
# across batch rows under vmap). Its dot fusion is correct and carries nearly all of the speed
# (measured: teacher step 0.72 s with dot only, 0.66 s with all three, 0.97 s with none), so kdjax
# keeps only that one. It takes effect if set before JAX starts its backend; a user's own setting
# of the flag wins. tests/test_xla_guard.py pins the correct result.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
if _YNN_FLAG not in _os.environ.get("XLA_FLAGS", ""):
  _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + f" {_YNN_FLAG}=dot").strip()
  import sys as _sys

  if "jax" in _sys.modules:
    from jax._src import xla_bridge as _xb

    if _xb.backends_are_initialized():
      import warnings as _warnings

      _warnings.warn(
          "kdjax was imported after JAX started its backend, so its guard against jaxlib "
          "0.10.2's CPU miscompile is not active: import kdjax before running any JAX "
          f"computation, or set XLA_FLAGS={_YNN_FLAG}=dot yourself.", stacklevel=2)
