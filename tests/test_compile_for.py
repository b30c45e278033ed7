"""scripts/compile_for.py and kdjax.aot: steps compiled by a TPU's and a GPU's own compiler on
compile-only devices, from this CPU.

Every test that compiles needs libtpu and JAX's CUDA plugin (requirements-tpu.txt,
requirements-gpu-compile.txt) and is marked `targets`: `pytest -m targets`, CI's second step.
They use a 4-chip TPU v5e and 8 H100s with a tiny config, then compile every shipped config's
every program for its declared target (the TPU compiler takes about a minute per training step
here).
"""

import importlib
import io
import subprocess
import sys

import pytest

from kdjax import aot
from support import scripts_loader
from test_configs import CASES

shakespeare = importlib.import_module("configs.shakespeare")
_GIB = 2**30


def _scratch_only(**data):
  """The smoke config's scratch mode (one training step and validation) with the batch geometry
  `data`, data-parallel over the target's devices."""
  config = shakespeare.get_config("smoke")
  config.mode = "scratch"
  config.data.update(data)
  config.mesh.update(dict(data=-1, fsdp=1))
  return config


def _report(config, target):
  out = io.StringIO()
  rows = aot.compile_config(config, target, out=out)
  return {r.phase: r for r in rows}, out.getvalue()


@pytest.mark.targets
@pytest.mark.parametrize("target", ["v5e-4", "h100x8"])
def test_a_step_that_fits_reports_the_compilers_bytes(target):
  rows, text = _report(_scratch_only(batch_size=8, eval_batch_size=8), target)
  assert set(rows) == {"scratch", "val (student)"} and all(r.fits() for r in rows.values()), text
  for name, r in rows.items():
    # The compiler's own count of a device's argument bytes against what the derived shardings
    # say it gets (the state's step counter, rng and guard scalars aside): exact on GPU; on TPU
    # every array is padded to the (8, 128) tiles of its layout, which tiny arrays feel most.
    shardings_say = r.state + r.teacher + r.batch
    if target == "h100x8":
      assert abs(r.arguments - shardings_say) <= 4096, (name, r)
    else:
      assert shardings_say <= r.arguments <= 2 * shardings_say, (name, r)
  assert f"{rows['scratch'].peak / _GIB:.2f}" in text


@pytest.mark.targets
@pytest.mark.parametrize("target, refusal", [
    ("v5e-4", "RESOURCE_EXHAUSTED"),  # the TPU compiler refuses the program itself
    ("h100x8", "exceeds the 59.3 GiB"),  # XLA:GPU compiles it; JAX's 75% share is checked here
])
def test_a_step_that_does_not_fit_fails_with_the_reason(target, refusal, monkeypatch):
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  # 131072 rows of 512 tokens: the scratch step's float32 logits alone are 1 TiB (128 GiB per
  # device of 8).
  rows, text = _report(_scratch_only(batch_size=131072, seq_len=512, eval_batch_size=8), target)
  assert not rows["scratch"].fits() and refusal in rows["scratch"].error, text
  assert f"DOES NOT FIT: {rows['scratch'].error}" in text
  # Validation still got its row, and fits.
  assert rows["val (student)"].fits(), text


@pytest.mark.targets
def test_the_cli_exits_1_when_a_program_does_not_fit_and_2_on_a_bad_target():
  args = [sys.executable, "scripts/compile_for.py", "--config=configs/shakespeare.py:smoke",
          "--config.mode=scratch", "--config.data.batch_size=131072",
          "--config.data.seq_len=512", "--config.mesh.data=-1", "--config.mesh.fsdp=1"]
  env = scripts_loader.subprocess_env()
  out = subprocess.run(args + ["--target=h100x8"], capture_output=True, text=True, env=env,
                       cwd=scripts_loader.ROOT)
  assert out.returncode == 1 and "DOES NOT FIT" in out.stdout, out.stderr[-2000:]
  bad = subprocess.run(args + ["--target=v9x-1"], capture_output=True, text=True, env=env,
                       cwd=scripts_loader.ROOT)
  last = bad.stderr.strip().splitlines()[-1]
  assert bad.returncode == 2 and "--target='v9x-1'" in last and "v5e-32" in last, bad.stderr


def test_a_missing_compiler_says_what_to_install(monkeypatch):
  monkeypatch.setattr(aot.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(aot.Unavailable, match=r"requirements-tpu\.txt"):
    aot.devices(aot.TARGETS["v5e-32"])
  with pytest.raises(aot.Unavailable, match=r"requirements-gpu-compile\.txt"):
    aot.devices(aot.TARGETS["h100x8"])


_DECLARED = [(name, preset) for name, preset in CASES
             if importlib.import_module(f"configs.{name}").get_config(preset).target.get(
                 "topology", "")]


@pytest.mark.targets
@pytest.mark.parametrize("name, preset", _DECLARED)
def test_every_shipped_config_fits_its_declared_target(name, preset):
  config = importlib.import_module(f"configs.{name}").get_config(preset)
  rows, text = _report(config, None)
  print(f"{name}:{preset}\n{text}")
  assert all(r.fits() for r in rows.values()), text
  assert {"distilled", "scratch", "val (student)", "eval (student)", "eval (teacher)"} <= set(rows)
  if config.num_samples:
    assert {"sample (student)", "sample (teacher)"} <= set(rows), text
