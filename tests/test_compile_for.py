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
  """The smoke config's scratch mode (one training step, evaluation and validation; no samples)
  with the batch geometry `data`."""
  config = shakespeare.get_config("smoke")
  config.mode = "scratch"
  config.num_samples = 0
  config.data.update(data)
  return config


def _report(config, target):
  out = io.StringIO()
  fits = aot.compile_config(config, target, out=out)
  return fits, out.getvalue()


def _rows(text):
  """{program: [state, teacher, batch, temp, peak, of, free]} from the printed table."""
  rows = {}
  for line in text.splitlines():
    parts = line.rsplit(None, 9)
    if len(parts) == 10 and parts[0].startswith(("scratch", "eval", "val", "teacher", "distil")):
      rows[parts[0]] = [float(x) for x in parts[1:8]]
  return rows


@pytest.mark.targets
@pytest.mark.parametrize("target", ["v5e-4", "h100x8"])
def test_a_step_that_fits_reports_the_compilers_bytes(target):
  config = _scratch_only(batch_size=8, eval_batch_size=8)
  config.mesh.update(dict(data=-1, fsdp=1))
  fits, text = _report(config, target)
  assert fits, text
  rows = _rows(text)
  assert set(rows) == {"scratch", "eval (student)", "val (student)"}, text
  for name, (state, teacher, batch, temp, peak, memory, free) in rows.items():
    # The compiler's live set holds at least the arguments the shardings say a device gets.
    assert peak * _GIB >= (state + teacher + batch) * _GIB - 0.01 * _GIB, name
    assert memory == aot.TARGETS[target].memory_gib and free == pytest.approx(memory - peak, abs=0.011)


@pytest.mark.targets
@pytest.mark.parametrize("target, refusal", [
    ("v5e-4", "RESOURCE_EXHAUSTED"),  # the TPU compiler refuses the program itself
    ("h100x8", "exceeds the 80 GiB"),  # XLA:GPU compiles it; the peak is checked here
])
def test_a_step_that_does_not_fit_fails_with_the_reason(target, refusal):
  # 131072 rows of 512 tokens: the scratch step's float32 logits alone are 1 TiB (128 GiB per
  # device of 8).
  config = _scratch_only(batch_size=131072, seq_len=512, eval_batch_size=8)
  config.mesh.update(dict(data=-1, fsdp=1))
  fits, text = _report(config, target)
  assert not fits
  line = next(l for l in text.splitlines() if "DOES NOT FIT" in l)
  assert refusal in line, text
  # Evaluation and validation still got their rows, and fit.
  assert {"eval (student)", "val (student)"} <= set(_rows(text)), text


@pytest.mark.targets
def test_the_cli_exits_1_when_a_program_does_not_fit_and_2_on_a_bad_target():
  args = [sys.executable, "scripts/compile_for.py", "--config=configs/shakespeare.py:smoke",
          "--config.mode=scratch", "--config.num_samples=0", "--config.data.batch_size=131072",
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
  fits, text = _report(config, None)
  print(f"{name}:{preset}\n{text}")
  assert fits, text
  rows = _rows(text)
  assert {"distilled", "scratch", "eval (student)", "val (student)"} <= set(rows), text
