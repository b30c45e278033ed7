"""Compiling kdjax's steps for hardware that is not here: a TPU slice or a GPU box, from a CPU.

JAX can describe a TPU topology (libtpu) or a GPU one (the CUDA plugin with XLA's target config
of the card) without the devices: `jax.experimental.topologies` gives compile-only devices, a
Mesh over them places abstract arrays, and the target's own compiler compiles the step. Its
`memory_analysis()` is what that device would hold, by the compiler that would run it, which an
estimate from XLA:CPU is not. On TPU a step that does not fit fails at compile time
(RESOURCE_EXHAUSTED); on GPU nothing raises, so the peak is compared with the card's memory here.

The process's own devices must stay CPU: set JAX_PLATFORMS=cpu before JAX starts (as
scripts/compile_for.py does). libtpu and the CUDA plugin are optional extras
(requirements-tpu.txt, requirements-gpu-compile.txt); `devices` says which one is missing.

The programs come from kdjax.aot_steps; this module knows targets, compiling and the report.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
from typing import Any

import jax
from jax.experimental import topologies

from kdjax import aot_steps, config_check, sharding

_GIB = 2**30
_SPECS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets")


@dataclasses.dataclass(frozen=True)
class Target:
  """Hardware a config declares (config.target.topology names one of TARGETS)."""

  name: str  # as the table prints it
  platform: str  # 'tpu' | 'cuda'
  topology: str  # libtpu's topology name, or the CUDA plugin's <slices>x<hosts>x<devices>
  devices: int
  memory_gib: float  # HBM per device
  peak_flops: float  # dense bf16 FLOP/s per device, from the data sheet (kdjax.flops)
  spec: str = ""  # GPU: XLA's target config text, a file in kdjax/targets


TARGETS = {
    "v5e-4": Target("TPU v5e-4", "tpu", "v5e:2x2", 4, 16.0, 197e12),
    "v5e-32": Target("TPU v5e-32", "tpu", "v5e:4x8", 32, 16.0, 197e12),
    "v5e-64": Target("TPU v5e-64", "tpu", "v5e:8x8", 64, 16.0, 197e12),
    "v5p-32": Target("TPU v5p-32", "tpu", "v5p:2x2x4", 16, 95.0, 459e12),
    "h100x8": Target("8x NVIDIA H100 80GB", "cuda", "1x1x8", 8, 80.0, 989e12,
                     spec="h100_sxm.txtpb"),
}

_EXTRAS = {
    "tpu": ("libtpu", "pip install -r requirements-tpu.txt (libtpu, about 700 MB)"),
    "cuda": ("jax_cuda12_plugin", "pip install -r requirements-gpu-compile.txt (JAX's CUDA "
             "plugin and ptxas, no driver)"),
}


class Unavailable(RuntimeError):
  """The target's compiler is not installed here."""


def target(key: str) -> Target:
  if key not in TARGETS:
    raise ValueError(f"--target={key!r} is not a known target; use one of {sorted(TARGETS)}.")
  return TARGETS[key]


def devices(tgt: Target) -> list[Any]:
  """The target's compile-only devices."""
  module, how = _EXTRAS[tgt.platform]
  if importlib.util.find_spec(module) is None:
    raise Unavailable(f"compiling for {tgt.name} needs {module}: {how}")
  if tgt.platform == "tpu":
    return list(topologies.get_topology_desc(topology_name=tgt.topology, platform="tpu").devices)
  with open(os.path.join(_SPECS, tgt.spec)) as f:
    spec = f.read()
  return list(topologies.get_topology_desc(topology_name=tgt.name, platform="cuda",
                                           topology=tgt.topology, target_config=spec).devices)


@dataclasses.dataclass(frozen=True)
class Row:
  """One compiled program's per-device bytes (state, teacher, batch from the shardings; the rest
  from the compiler) and its FLOPs per step over all devices."""

  phase: str
  state: int
  teacher: int
  batch: int
  temp: int = 0
  peak: int = 0
  flops: float = 0.0
  error: str = ""  # the compiler's refusal (TPU), or why the peak does not fit (GPU)

  def fits(self) -> bool:
    return not self.error


def compile_program(program, tgt: Target) -> Row:
  """Lowers and compiles one kdjax.aot_steps.Program for `tgt`; a refusal becomes the row's
  error, so that every phase gets its row."""
  base = dict(phase=program.phase, state=program.state, teacher=program.teacher,
              batch=program.batch, flops=program.flops)
  try:
    with jax.set_mesh(program.mesh):
      compiled = program.fn.lower(*program.args, **program.kwargs).compile()
  except Exception as e:  # pylint: disable=broad-except  (the compiler's own words go in the row)
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return Row(**base, error=_first_line(str(e)))
  mem = compiled.memory_analysis()
  # What a device holds at once, at most: arguments and outputs (less the donated buffers they
  # share) plus temporaries. XLA:GPU's own peak_memory_in_bytes agrees; XLA:TPU's counts less
  # than its temporaries alone, so the larger of the two is the row's peak.
  peak = max(getattr(mem, "peak_memory_in_bytes", 0),
             mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes)
  error = ""
  if peak > tgt.memory_gib * _GIB:
    error = (f"peak {peak / _GIB:.2f} GiB exceeds the {tgt.memory_gib:.0f} GiB of one "
             f"{tgt.name} device")
  return Row(**base, temp=mem.temp_size_in_bytes, peak=peak, error=error)


def _first_line(message: str) -> str:
  line = next((l for l in message.splitlines() if "RESOURCE_EXHAUSTED" in l), message)
  return re.sub(r"\s+", " ", line).strip()[:300]


def table(rows: list[Row], tgt: Target, step_time: float | None = None) -> str:
  """The per-device report. MFU at `step_time` seconds per step when given, else the fastest
  step the data-sheet peak allows (at 100% MFU)."""
  speed = "MFU" if step_time else "t@100%"
  lines = [f"{'phase':<16} {'state':>7} {'teacher':>7} {'batch':>7} {'temp':>7} {'peak':>7} "
           f"{'of':>5} {'free':>7} {'TFLOP/step':>11} {speed:>7}   (GiB per device)"]
  for r in rows:
    flops = f"{r.flops / 1e12:>11.1f}" if r.flops else f"{'-':>11}"
    ideal = r.flops / (tgt.peak_flops * tgt.devices) if r.flops else 0.0
    rate = (f"{ideal / step_time:>7.1%}" if step_time else f"{ideal:>6.2f}s") if r.flops else ""
    mem = (f"{r.temp / _GIB:>7.2f} {r.peak / _GIB:>7.2f} {tgt.memory_gib:>5.0f} "
           f"{tgt.memory_gib - r.peak / _GIB:>7.2f}") if r.peak else f"{'':>29}"
    lines.append(f"{r.phase:<16} {r.state / _GIB:>7.2f} {r.teacher / _GIB:>7.2f} "
                 f"{r.batch / _GIB:>7.2f} {mem} {flops} {rate:>7}"
                 + (f"\n  DOES NOT FIT: {r.error}" if r.error else ""))
  return "\n".join(lines)


def compile_config(config, target_key: str | None = None, step_time: float | None = None,
                   out=sys.stdout) -> bool:
  """Compiles every program of `config` for its target (config.target.topology, or
  `target_key`), printing the table a row at a time; True when all of them fit."""
  key = target_key or config.target.get("topology", "")
  if not key:
    raise ValueError("config.target.topology: the config names no target to compile for; set it "
                     f"or pass --target (one of {sorted(TARGETS)}).")
  tgt = target(key)
  if not target_key and int(config.target.devices) != tgt.devices:
    raise ValueError(f"config.target.devices: {config.target.devices}, but its topology {key!r} "
                     f"has {tgt.devices}; make them agree.")
  config_check.check_config(config, tgt.devices, int(config.target.processes))
  mesh = sharding.make_mesh(config.mesh, devices(tgt))
  print(f"{tgt.name} ({key}: {tgt.devices} devices of {tgt.memory_gib:.0f} GiB), mesh "
        f"{dict(mesh.shape)}", file=out, flush=True)
  rows = []
  for program in aot_steps.programs(config, mesh):
    rows.append(compile_program(program, tgt))
    lines = table(rows[-1:], tgt, step_time).split("\n")
    print("\n".join(lines if len(rows) == 1 else lines[1:]), file=out, flush=True)
  return all(r.fits() for r in rows)
