r"""Times each matmul shape of a config's training step alone, in JAX and in PyTorch, interleaved.

  python scripts/matmul_shapes.py --config=configs/bench_cpu.py --reps=21   # ~30 s on 2 cores

Needs kdjax installed (`pip install -e .`) and, for the PyTorch column, torch
(requirements-dev.txt has both).

For every distinct [M, K] x [K, N] float32 matmul of the step (the teacher's forward, the
student's forward and its two backward matmuls per weight, the fused loss's per-chunk logits
and their gradients; M = batch * seq_len tokens, or a loss chunk's tokens) and the 2048^3
reference, one JSON line: the roles that use the shape, how many times a step runs it
(`per_step`) and its GFLOP per step, JAX's GFLOP/s (jit; the process's XLA flags, so kdjax's
YNNPACK dot fusion unless XLA_FLAGS says otherwise) and PyTorch's (torch.matmul on all the
CPU's cores, as XLA:CPU uses them; left out where torch is not installed), each the median of
--reps calls on random operands, the two libraries' calls alternating so that both see the same
machine. `jax_over_torch` > 1 means JAX is faster. A last line adds up the step's matmuls: their
GFLOP and the milliseconds they take at each library's rates.

It tells slow kernels apart from a slow step: the step's profile (scripts/benchmark.py
--profile) gives each matmul's time inside the step, where XLA runs independent instructions
side by side; this gives each kernel's rate alone.
"""

import json
import os
import statistics
import time

import kdjax  # noqa: F401  (XLA flags before JAX starts)

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from kdjax.model import ModelConfig



def _model_shapes(role: str, cfg: ModelConfig, tokens: int, backward: bool):
  """(role, M, K, N, times per step) of a decoder's projections; with `backward`, also the dX and
  dW matmuls of each."""
  q, kv, layers = cfg.num_heads * cfg.head_size, cfg.num_kv_heads * cfg.head_size, cfg.num_layers
  forward = [("qkv", cfg.d_model, q, 1), ("qkv", cfg.d_model, kv, 2), ("out", q, cfg.d_model, 1),
             ("gate/up", cfg.d_model, cfg.mlp_dim, 2), ("down", cfg.mlp_dim, cfg.d_model, 1)]
  shapes = [(f"{role} {name}", tokens, k, n, c * layers) for name, k, n, c in forward]
  if backward:  # y = x W: dX = dY W^T ([T, N] x [N, K]), dW = X^T dY ([K, T] x [T, N])
    shapes += [(f"{role} {name} dX", tokens, n, k, c * layers) for name, k, n, c in forward]
    shapes += [(f"{role} {name} dW", k, tokens, n, c * layers) for name, k, n, c in forward]
  return shapes


def step_shapes(config) -> list[tuple[str, int, int, int, int]]:
  """Every float32 matmul of the config's distillation step as (roles, M, K, N, times per step),
  one entry per distinct shape, after the 2048^3 reference (0 times). Attention's own matmuls
  (scores and values) are left out: they are a few percent of the FLOPs at these lengths."""
  s_cfg, t_cfg = ModelConfig.from_dict(config.student), ModelConfig.from_dict(config.teacher)
  b, length = int(config.data.batch_size), int(config.data.seq_len)
  chunk_size = int(config.distill.loss_chunk_size) or b * length  # 0: the loss is unchunked
  per_row = min(max(1, chunk_size // b), length)  # as kdjax.losses.chunked cuts the length axis
  chunks, chunk, v = -(-length // per_row), b * per_row, s_cfg.vocab_size
  shapes = [("reference", 2048, 2048, 2048, 0)]
  shapes += _model_shapes("teacher", t_cfg, b * length, backward=False)
  shapes += _model_shapes("student", s_cfg, b * length, backward=True)
  shapes += [("teacher logits", chunk, t_cfg.d_model, v, chunks),
             ("student logits", chunk, s_cfg.d_model, v, chunks),
             ("student logits dX", chunk, v, s_cfg.d_model, chunks),
             ("student logits dW", s_cfg.d_model, chunk, v, chunks)]
  by_shape: dict[tuple[int, int, int], tuple[list[str], int]] = {}
  for role, m, k, n, count in shapes:
    roles, total = by_shape.get((m, k, n), ([], 0))
    by_shape[(m, k, n)] = (roles + [role] * (role not in roles), total + count)
  return [(", ".join(roles), *mkn, count) for mkn, (roles, count) in by_shape.items()]


def _timer(fn):
  def timed():
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
  return timed


def time_shapes(shapes, reps: int, use_torch: bool = True):
  """One dict per shape: JAX's and (where installed) PyTorch's median GFLOP/s."""
  try:
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
  except ImportError:
    torch = None
  rng = np.random.default_rng(0)
  rows = []
  for role, m, k, n, per_step in shapes:
    a, b = (rng.standard_normal(s, dtype=np.float32) for s in ((m, k), (k, n)))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    matmul = jax.jit(jnp.matmul)
    calls = {"jax": _timer(lambda: matmul(ja, jb).block_until_ready())}
    if torch is not None and use_torch:
      ta, tb = torch.from_numpy(a), torch.from_numpy(b)
      calls["torch"] = _timer(lambda: torch.matmul(ta, tb))
    times = {name: [] for name in calls}
    for name, call in calls.items():  # compile and warm up
      call()
    for _ in range(reps):
      for name, call in calls.items():
        times[name].append(call())
    row = {"shape": f"[{m}, {k}] x [{k}, {n}]", "roles": role, "per_step": per_step,
           "gflop_per_step": 2 * m * k * n * per_step / 1e9}
    for name, ts in times.items():
      row[f"{name}_gflops"] = 2 * m * k * n / statistics.median(ts) / 1e9
    if "torch_gflops" in row:
      row["jax_over_torch"] = row["jax_gflops"] / row["torch_gflops"]
    rows.append(row)
  return rows


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/bench_cpu.py")
  rows = time_shapes(step_shapes(_CONFIG.value), _REPS.value)
  for row in rows + [step_total(rows)]:
    print(json.dumps({key: round(x, 3) if isinstance(x, float) else x for key, x in row.items()}))


def step_total(rows) -> dict:
  """The step's matmuls at each library's rates: GFLOP and milliseconds per step."""
  total = {"shape": "(the step's matmuls)", "gflop": sum(r["gflop_per_step"] for r in rows)}
  for lib in ("jax", "torch"):
    if all(f"{lib}_gflops" in r for r in rows):
      total[f"{lib}_ms"] = sum(1e3 * r["gflop_per_step"] / r[f"{lib}_gflops"] for r in rows)
  return total


if __name__ == "__main__":
  # Flags only when run as a command: the tests import this module next to scripts/benchmark.py,
  # which defines --config too.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config whose step's shapes to time.")
  _REPS = flags.DEFINE_integer("reps", 21, "Timed calls per shape and library (the median).")
  app.run(main)
