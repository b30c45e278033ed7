"""The training loop of one phase (teacher, distilled student or scratch student).

The loop only feeds batches and reads metrics: all math is in the compiled step. Metrics of step N
are read after step N+1 has been dispatched, so the host never stalls the device on a log line.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable, Iterator

import jax
import numpy as np

from kdjax import checkpoint, sharding, train
from kdjax.metric_log import MetricLog
from kdjax.model import ModelConfig


@dataclasses.dataclass
class Teacher:
  cfg: ModelConfig
  params: Any
  shardings: Any


@dataclasses.dataclass
class PhaseResult:
  params: Any
  final_step: int
  trained_steps: int  # steps run by this call (0 when the phase was already complete)


def device_batch(batch: dict[str, np.ndarray], batch_sharding) -> dict[str, jax.Array]:
  """Global arrays from this process's rows (the same call works on one or many hosts)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}


def run_phase(*, phase: str, phase_dir: str, model_cfg: ModelConfig, train_cfg: Any,
              seed: int, mesh, rules, make_train_iter: Callable[[], Iterator], tokens_per_step: int,
              config_dict: dict, teacher: Teacher | None = None,
              distill: train.DistillSettings | None = None, log_every: int = 10,
              checkpoint_every: int = 100, keep_checkpoints: int = 2,
              show_progress: bool = True) -> PhaseResult:
  """Trains `model_cfg` for `train_cfg.steps`, resuming from the phase's latest checkpoint."""
  tx = train.make_optimizer(train_cfg)
  schedule = train.make_schedule(train_cfg)
  state, state_shardings = train.create_train_state(model_cfg, tx, seed, mesh, rules)
  ckpts = checkpoint.PhaseCheckpoints(os.path.join(phase_dir, "checkpoints"),
                                      max_to_keep=keep_checkpoints)
  data_iter = make_train_iter()
  start = ckpts.latest_step() or 0
  if start:
    state, data_state = ckpts.restore(start, state, state_shardings)
    data_iter.set_state(data_state)
    if start < int(train_cfg.steps):
      print(f"{phase}: resuming from step {start}", file=sys.stderr)
  total = int(train_cfg.steps)
  if start >= total:
    ckpts.close()
    return PhaseResult(state.params, start, 0)

  step_fn = train.jit_train_step(
      train.make_train_step(model_cfg, tx, schedule, t_cfg=teacher and teacher.cfg,
                            distill=distill,
                            grad_accum_steps=int(train_cfg.get("grad_accum_steps", 1))),
      state_shardings, teacher.shardings if teacher else None, mesh)
  teacher_params = teacher.params if teacher else None
  batch_sharding = sharding.batch_sharding(mesh)
  log = MetricLog(phase_dir, phase=phase, start_step=start, total_steps=total,
                  tokens_per_step=tokens_per_step, show_progress=show_progress)
  pending = None  # (step, device metrics) waiting to be read
  try:
    for step in range(start + 1, total + 1):
      batch = device_batch(next(data_iter), batch_sharding)
      state, metrics = step_fn(state, teacher_params, batch)
      if pending is not None:
        log.write(pending[0], jax.device_get(pending[1]))
        pending = None
      if step % log_every == 0 or step == total:
        pending = (step, metrics)
      if step % checkpoint_every == 0 or step == total:
        # The iterator state is taken after this step's batch, so a resume continues after it.
        ckpts.save(step, state, data_iter.get_state(), config_dict)
    if pending is not None:
      log.write(pending[0], jax.device_get(pending[1]))
  finally:
    ckpts.wait()
    ckpts.close()
    log.close()
  return PhaseResult(state.params, total, total - start)
