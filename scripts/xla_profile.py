"""Where a compiled XLA program spends its time: per-instruction times from a profiler trace,
named by the HLO they run. scripts/benchmark.py --profile prints this table for the step.

  rows, wall_ms = xla_profile.profile(compiled.as_text(), run_one_step, steps=5, top=25)

Each row is one top-level instruction of the compiled program (a fusion, a matmul, a copy...):
the milliseconds it took per step (the sum over its calls, from the trace of `steps` runs,
divided by `steps`), its share of the step's measured wall time, what it is (its kind and the
ops it fuses), its output shape, and where it comes from (the JAX op name of its root, trimmed
to the module path: e.g. `transpose(jvp(Transformer))/layers/attention/...`).

XLA:CPU records one trace event per instruction it runs (its "thunks"); events of the host
thread pool (`...Await`, `ExecuteHelper...`) are the runtime, not the program's work, and are
left out.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax

# `name = shape opcode(operands...), attributes`; a shape is an array type with its layout, or
# a tuple of them (one level of nesting), as a multi-output fusion or a loop returns.
_SHAPE = r"\((?:[^()]|\([^()]*\))*\)|\S+?"
_INSTRUCTION = re.compile(
    rf"^\s*(?:ROOT )?%?([\w.\-]+) = ({_SHAPE})(?:\{{[^}}]*\}})? (\w[\w-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_SKIP = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}
# Instructions whose trace events span the instructions they run: counting them would count
# their bodies twice.
_CONTAINERS = {"while", "call", "conditional"}


def _hlo_index(hlo_text: str):
  """({instruction: (opcode, shape, op_name, called computation)}, {computation: [opcodes]})."""
  instructions, computations, current = {}, collections.defaultdict(list), None
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      current = head.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode, rest = match.groups()
    op_name = _OP_NAME.search(rest)
    calls = _CALLS.search(rest)
    instructions[name] = (opcode, shape, op_name.group(1) if op_name else "",
                          calls.group(1) if calls else None)
    computations[current].append((opcode, op_name.group(1) if op_name else ""))
  return instructions, computations


def _describe(name: str, instructions, computations) -> tuple[str, str, str]:
  """(what, shape, where) of one top-level instruction."""
  opcode, shape, op_name, called = instructions.get(name, ("?", "?", "", None))
  fused = computations.get(called, []) if called else []
  ops = sorted({op for op, _ in fused if op not in _SKIP})
  what = opcode if not ops else f"{opcode}: {','.join(ops[:6])}{',...' if len(ops) > 6 else ''}"
  if not op_name and fused:  # a fusion's own metadata may be empty: take its root's
    op_name = fused[-1][1]
  where = re.sub(r"^jit\([^)]*\)/", "", op_name)
  return what, shape, where


def _trace_events(trace_dir: str):
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise RuntimeError(f"the profiler wrote no perfetto trace under {trace_dir}")
  with gzip.open(paths[0]) as f:
    data = json.load(f)
  return [e for e in (data["traceEvents"] if isinstance(data, dict) else data)
          if e.get("ph") == "X"]


def profile(hlo_text: str, run, steps: int = 5, top: int = 25) -> tuple[list[dict], float]:
  """Calls `run()` (one step of the program compiled to `hlo_text`, waited for) `steps` times
  under the profiler: (the top rows and a total row, wall ms per step)."""
  instructions, computations = _hlo_index(hlo_text)
  run()
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      start = time.perf_counter()
      for _ in range(steps):
        run()
      wall_ms = 1e3 * (time.perf_counter() - start) / steps
    events = _trace_events(trace_dir)
  per_name = collections.defaultdict(float)
  for event in events:
    if event["name"] in instructions and instructions[event["name"]][0] not in _CONTAINERS:
      per_name[event["name"]] += event["dur"] / 1e3 / steps
  rows = []
  for name, ms in sorted(per_name.items(), key=lambda kv: -kv[1]):
    what, shape, where = _describe(name, instructions, computations)
    rows.append({"instruction": name, "ms": round(ms, 2), "share": round(ms / wall_ms, 4),
                 "what": what, "shape": shape, "where": where})
  kinds = by_kind(rows)
  rows = rows[:top]
  covered = sum(per_name.values())
  rows.append({"instruction": "(all instructions)", "ms": round(covered, 2),
               "share": round(covered / wall_ms, 4), "what": f"{len(per_name)} instructions",
               "shape": "", "where": json.dumps(kinds)})
  return rows, wall_ms


def by_kind(rows: list[dict]) -> dict[str, float]:
  """Milliseconds per step summed by kind: matmuls (a dot, or a fusion holding one), other
  fusions by the name XLA gave them (ynn_fusion..., fusion...), other instructions by opcode."""
  totals = collections.Counter()
  for row in rows:
    if "dot" in (op.strip() for op in row["what"].split(":")[-1].split(",")):
      kind = "matmul"
    elif row["what"].startswith("fusion"):
      kind = re.sub(r"[.\d]+$", "", row["instruction"])
    else:
      kind = row["what"].split(":")[0]
    totals[kind] += row["ms"]
  return {k: round(v, 1) for k, v in totals.most_common()}
