"""Compiles every step a config runs for its target hardware, from this machine, and reports
what one device would hold: no TPU or GPU needed (kdjax.aot).

  python scripts/compile_for.py --config=configs/lm1b.py
  python scripts/compile_for.py --config=configs/lm1b.py:v5e_32
  python scripts/compile_for.py --config=configs/gemma2_9b_to_2b.py:v5p_32 --step_time=4.2
  python scripts/compile_for.py --config=configs/lm1b.py --target=v5e-64 --config.mesh.data=8

Needs kdjax installed (`pip install -e .`) and the target's compiler: `pip install -r
requirements-tpu.txt` (libtpu) for TPU targets, `pip install -r requirements-gpu-compile.txt`
(JAX's CUDA plugin and ptxas; no GPU or driver) for GPU ones. Without it, it says so in one line.

--target defaults to the config's `config.target.topology` (kdjax.aot.TARGETS). Each phase the
config's mode runs (teacher training, distillation, scratch), then evaluation, validation and
sampling of each trained model, is built with the config's own mesh, rules, dtypes, shardings and
chunking over the target's compile-only devices and compiled by the target's compiler. One table:
per device, params + optimizer state ('state'), the frozen teacher, the batch, the compiler's
temporaries and peak, the device's memory and what is left; the step's FLOPs over all devices
(kdjax.flops: the formula, since XLA counts a scanned layer once) and the training steps' MFU
at --step_time seconds per step (without it, each program's time at 100% MFU). Exit status 1
when any program does not fit, with the compiler's own message (TPU) or the peak against the
share of the card that JAX takes (GPU: XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 unless set; set it
as the GPU machine will). Exit status 2, with one line, for a bad target or config or a missing
compiler.
Seconds to minutes per program on a laptop CPU (the TPU compiler takes longest).
"""

from __future__ import annotations

import os
import sys

# The process's own devices stay CPU: the target's devices are compile-only ones. Several
# processes may each load libtpu to compile (none owns a TPU).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import kdjax  # noqa: E402,F401  (XLA flags before JAX starts)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from kdjax import aot, config_check  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config, e.g. configs/lm1b.py:v5e_32.",
                                          lock_config=False)
_TARGET = flags.DEFINE_string("target", None, "One of kdjax.aot.TARGETS; default: the config's "
                              "config.target.topology.")
_STEP_TIME = flags.DEFINE_float("step_time", None, "Seconds per training step, for the MFU column "
                                "(default: the step time at 100% MFU instead).")


def main(argv):
  del argv
  try:
    rows = aot.compile_config(_CONFIG.value, _TARGET.value, _STEP_TIME.value)
  except (aot.Unavailable, aot.TargetError, config_check.ConfigError) as e:
    print(f"compile_for: {e}", file=sys.stderr)
    sys.exit(2)
  sys.exit(0 if all(row.fits() for row in rows) else 1)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
