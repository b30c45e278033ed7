"""The training loop of one phase (teacher, distilled student or scratch student).

The loop only feeds batches and reads metrics: all math is in the compiled step. Metrics of step N
are read after step N+1 has been dispatched, so the host never stalls the device on a log line.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
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


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


class Preempted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint of the current step was written."""


class _StopSignals:
  """Turns SIGTERM/SIGINT into a flag the loop checks once per step (main thread only)."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.received = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def run_phase(*, phase: str, phase_dir: str, model_cfg: ModelConfig, train_cfg: Any,
              seed: int, mesh, rules, make_train_iter: Callable[[], Iterator], tokens_per_step: int,
              config_dict: dict, log_every: int, checkpoint_every: int, keep_checkpoints: int,
              nonfinite_patience: int, teacher: Teacher | None = None,
              distill: train.DistillSettings | None = None,
              val_loss_fn: Callable[[Any], float] | None = None,
              show_progress: bool = True) -> PhaseResult:
  """Trains `model_cfg` for `train_cfg.steps`, resuming from the phase's latest checkpoint.

  Raises Preempted after checkpointing if SIGTERM/SIGINT arrives, and NonFiniteError after
  `nonfinite_patience` consecutive skipped (non-finite) steps, leaving the last checkpoint intact.
  `val_loss_fn(params)`, if given, is evaluated at each checkpoint: it decides which checkpoint is
  kept as the best and is logged as `val_loss` in that step's metrics row.
  """
  tx = train.make_optimizer(train_cfg)
  schedule = train.make_schedule(train_cfg)
  state, state_shardings = train.create_train_state(model_cfg, tx, seed, mesh, rules)
  ckpts = checkpoint.PhaseCheckpoints(os.path.join(phase_dir, "checkpoints"),
                                      max_to_keep=keep_checkpoints)
  data_iter = make_train_iter()
  restored = ckpts.restore_latest_valid(state, state_shardings)
  start = 0
  if restored is not None:
    start, state, data_state = restored
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
  last_saved = start
  val_losses = {}  # step -> held-out loss, merged into that step's metrics row
  previous = None  # (step, device metrics) of the step before the one just dispatched

  def settle(step_metrics):
    """Host side of a finished step: log it if due, stop on too many non-finite steps."""
    done_step, device_metrics = step_metrics
    if done_step % log_every == 0 or done_step == total or done_step in val_losses:
      row = jax.device_get(device_metrics)
      if done_step in val_losses:
        row = dict(row, val_loss=val_losses.pop(done_step))
      log.write(done_step, row)
    if int(jax.device_get(device_metrics["nonfinite_streak"])) >= nonfinite_patience:
      raise NonFiniteError(
          f"{phase}: {nonfinite_patience} consecutive steps up to step {done_step} had a "
          f"non-finite loss or gradient; their updates were skipped and the last checkpoint "
          f"(step {last_saved}) is intact. Lower the learning rate, check the data, or raise "
          "config.nonfinite_patience.")

  try:
    with _StopSignals() as signals:
      for step in range(start + 1, total + 1):
        batch = device_batch(next(data_iter), batch_sharding)
        state, metrics = step_fn(state, teacher_params, batch)
        if previous is not None:
          settle(previous)  # reads step N-1 while step N runs
        previous = (step, metrics)  # not the state: its buffers are donated to the next step
        if step % checkpoint_every == 0 or step == total or signals.received:
          # The iterator state is taken after this step's batch, so a resume continues after it.
          if val_loss_fn is not None and not signals.received:
            val_losses[step] = val_loss_fn(state.params)
          ckpts.save(step, state, data_iter.get_state(), config_dict, val_losses.get(step))
          last_saved = step
        if signals.received:
          settle(previous)
          ckpts.wait()
          raise Preempted(f"{phase}: received {signal.Signals(signals.received).name}; saved a "
                          f"checkpoint at step {step} in {phase_dir}. Rerun the same command "
                          "to resume.")
      settle(previous)
  finally:
    ckpts.wait()
    ckpts.close()
    log.close()
  return PhaseResult(state.params, total, total - start)
