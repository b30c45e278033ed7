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

from kdjax import aot_steps, config_check, flops, sharding

_GIB = 2**30
_SPECS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets")


@dataclasses.dataclass(frozen=True)
class Target:
  """Hardware a config declares (config.target.topology names one of TARGETS)."""

  name: str  # as the table prints it
  platform: str  # 'tpu' | 'cuda'
  topology: str  # libtpu's topology name, or the CUDA plugin's <slices>x<hosts>x<devices>
  devices: int
  memory_gib: float  # HBM per device (the GPU's as its target config gives it)
  kind: str  # its name in kdjax.flops.DATASHEET
  spec: str = ""  # GPU: XLA's target config text, a file in kdjax/targets
  # TPU: libtpu's topology options beyond the name, e.g. a single chip's host bounds.
  tpu_options: tuple[tuple[str, tuple[int, ...]], ...] = ()

  @property
  def peak_flops(self) -> float:
    """Dense bf16 FLOP/s per device, from the data sheet."""
    return flops.DATASHEET[(self.kind, "bfloat16")]


TARGETS = {
    # One chip, as a Colab TPU runtime has it: libtpu's default host is 2x2 chips.
    "v5e-1": Target("TPU v5e-1", "tpu", "v5e:1x1", 1, 16.0, "TPU v5e",
                    tpu_options=(("chips_per_host_bounds", (1, 1, 1)),)),
    "v5e-4": Target("TPU v5e-4", "tpu", "v5e:2x2", 4, 16.0, "TPU v5e"),
    "v5e-32": Target("TPU v5e-32", "tpu", "v5e:4x8", 32, 16.0, "TPU v5e"),
    "v5e-64": Target("TPU v5e-64", "tpu", "v5e:8x8", 64, 16.0, "TPU v5e"),
    "v5p-32": Target("TPU v5p-32", "tpu", "v5p:2x2x4", 16, 95.0, "TPU v5p"),
    # h100_sxm.txtpb's device_memory_size, 84,942,979,072 bytes.
    "h100x8": Target("8x NVIDIA H100 80GB", "cuda", "1x1x8", 8, 79.11, "H100",
                     spec="h100_sxm.txtpb"),
}

_EXTRAS = {
    "tpu": ("libtpu", "pip install -r requirements-tpu.txt (libtpu, about 700 MB)"),
    "cuda": ("jax_cuda12_plugin", "pip install -r requirements-gpu-compile.txt (JAX's CUDA "
             "plugin and ptxas, no driver)"),
}


class Unavailable(RuntimeError):
  """The target's compiler is not installed here."""


class TargetError(ValueError):
  """No such target, or a config that disagrees with its own."""


def target(key: str) -> Target:
  if key not in TARGETS:
    raise TargetError(f"--target={key!r} is not a known target; use one of {sorted(TARGETS)}.")
  return TARGETS[key]


def usable_gib(tgt: Target) -> float:
  """What one device offers a program. A TPU's compiler checks its HBM itself. On GPU, JAX
  reserves XLA_PYTHON_CLIENT_MEM_FRACTION of the card (0.75 unless set) and runs out of memory
  past it, so a GPU step must fit that share: set the variable here as on the GPU machine."""
  if tgt.platform != "cuda":
    return tgt.memory_gib
  return tgt.memory_gib * float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))


def devices(tgt: Target) -> list[Any]:
  """The target's compile-only devices."""
  module, how = _EXTRAS[tgt.platform]
  if importlib.util.find_spec(module) is None:
    raise Unavailable(f"compiling for {tgt.name} needs {module}: {how}")
  if tgt.platform == "tpu":
    options = {name: list(value) for name, value in tgt.tpu_options}
    return list(topologies.get_topology_desc(topology_name=tgt.topology, platform="tpu",
                                             **options).devices)
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
  arguments: int = 0  # the compiler's own count of the argument bytes
  flops: float = 0.0
  trains: bool = False  # a training step: MFU is for these
  error: str = ""  # the compiler's refusal (TPU), or why the peak does not fit (GPU)

  def fits(self) -> bool:
    return not self.error


def compile_program(program, tgt: Target) -> Row:
  """Lowers and compiles one kdjax.aot_steps.Program for `tgt`; a refusal becomes the row's
  error, so that every phase gets its row."""
  base = dict(phase=program.phase, state=program.state, teacher=program.teacher,
              batch=program.batch, flops=program.flops, trains=program.trains)
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
  if peak > usable_gib(tgt) * _GIB:
    error = (f"peak {peak / _GIB:.2f} GiB exceeds the {usable_gib(tgt):.1f} GiB that one "
             f"{tgt.name} device offers")
  return Row(**base, temp=mem.temp_size_in_bytes, peak=peak,
             arguments=mem.argument_size_in_bytes, error=error)


def _first_line(message: str) -> str:
  line = next((l for l in message.splitlines() if "RESOURCE_EXHAUSTED" in l), message)
  return re.sub(r"\s+", " ", line).strip()[:300]


def table(rows: list[Row], tgt: Target, step_time: float | None = None) -> str:
  """The per-device report. The training steps' MFU at `step_time` seconds per step when given,
  else the fastest step the data-sheet peak allows (at 100% MFU) for every program."""
  speed = "MFU" if step_time else "t@100%"
  lines = [f"{'phase':<16} {'state':>7} {'teacher':>7} {'batch':>7} {'temp':>7} {'peak':>7} "
           f"{'of':>5} {'free':>7} {'TFLOP/step':>11} {speed:>7}   (GiB per device)"]
  for r in rows:
    tflop = f"{r.flops / 1e12:>11.1f}" if r.flops else f"{'-':>11}"
    ideal = r.flops / (tgt.peak_flops * tgt.devices) if r.flops else 0.0
    rate = "" if not r.flops else f"{ideal:>6.2f}s" if not step_time else (
        f"{ideal / step_time:>7.1%}" if r.trains else "")
    usable = usable_gib(tgt)
    mem = (f"{r.temp / _GIB:>7.2f} {r.peak / _GIB:>7.2f} {usable:>5.1f} "
           f"{usable - r.peak / _GIB:>7.2f}") if r.peak else f"{'':>29}"
    lines.append(f"{r.phase:<16} {r.state / _GIB:>7.2f} {r.teacher / _GIB:>7.2f} "
                 f"{r.batch / _GIB:>7.2f} {mem} {tflop} {rate:>7}"
                 + (f"\n  DOES NOT FIT: {r.error}" if r.error else ""))
  return "\n".join(lines)


def compile_config(config, target_key: str | None = None, step_time: float | None = None,
                   out=sys.stdout) -> list[Row]:
  """Compiles every program of `config` for its target (config.target.topology, or
  `target_key`), printing the table a row at a time; returns the rows."""
  key = target_key or config.target.get("topology", "")
  if not key:
    raise TargetError("config.target.topology: the config names no target to compile for; set "
                      f"it or pass --target (one of {sorted(TARGETS)}).")
  tgt = target(key)
  if not target_key and int(config.target.devices) != tgt.devices:
    raise TargetError(f"config.target.devices: {config.target.devices}, but its topology "
                      f"{key!r} has {tgt.devices}; make them agree.")
  config_check.check_config(config, tgt.devices, int(config.target.processes))
  mesh = sharding.make_mesh(config.mesh, devices(tgt))
  share = (f", JAX's share {usable_gib(tgt):.1f} GiB (XLA_PYTHON_CLIENT_MEM_FRACTION)"
           if tgt.platform == "cuda" else "")
  print(f"{tgt.name} ({key}: {tgt.devices} devices of {tgt.memory_gib:.1f} GiB{share}), mesh "
        f"{dict(mesh.shape)}", file=out, flush=True)
  rows = []
  for program in aot_steps.programs(config, mesh):
    rows.append(compile_program(program, tgt))
    lines = table(rows[-1:], tgt, step_time).split("\n")
    print("\n".join(lines if len(rows) == 1 else lines[1:]), file=out, flush=True)
  return rows
