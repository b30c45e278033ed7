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
  rules: Any = None  # its activation rules (None: the student's)


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


_sync_calls = 0  # preemption-service checks made by this process, across all phases


class _StopSignals:
  """Turns SIGTERM/SIGINT into a stop that the loop checks once per step (main thread only).

  With several processes, every process must stop and checkpoint at the same step, or the
  collective save would hang. JAX's preemption service (started by jax.distributed.initialize)
  catches SIGTERM on any process and agrees on a step for all: the loop asks it every step
  instead of catching SIGTERM itself. SIGINT stays local (an interactive Ctrl-C).
  """

  def __init__(self):
    self.received: int | None = None
    self._previous = {}
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in ((signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.received = signum

  def check(self) -> bool:
    """True if the run should checkpoint now and stop (call once per step, on all hosts)."""
    global _sync_calls
    if self._multi and self.received is None:
      from jax.experimental import multihost_utils
      # The service wants ids that only grow; phase steps restart at 1, so count the calls
      # (every process makes the same calls, so the counts agree).
      _sync_calls += 1
      if multihost_utils.reached_preemption_sync_point(_sync_calls):
        self.received = signal.SIGTERM
    return self.received is not None

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def run_phase(*, phase: str, phase_dir: str, model_cfg: ModelConfig, train_cfg: Any,
              seed: int, mesh, rules, make_train_iter: Callable[[], Iterator], tokens_per_step: int,
              config_dict: dict, log_every: int, checkpoint_every: int, keep_checkpoints: int,
              nonfinite_patience: int, teacher: Teacher | None = None,
              distill: train.DistillSettings | None = None,
              val_loss_fn: Callable[[Any], float] | None = None,
              init_params: Callable[[], Any] | None = None,
              show_progress: bool = True) -> PhaseResult:
  """Trains `model_cfg` for `train_cfg.steps`, resuming from the phase's latest checkpoint.

  Raises Preempted after checkpointing if SIGTERM/SIGINT arrives, and NonFiniteError after
  `nonfinite_patience` consecutive skipped (non-finite) steps, leaving the last checkpoint intact.
  `val_loss_fn(params)`, if given, is evaluated at each checkpoint: it decides which checkpoint is
  kept as the best and is logged as `val_loss` in that step's metrics row.
  `init_params()`, if given, replaces the seed's random params at step 0 (e.g. a student pruned
  from the teacher); it must return them in the state's shardings and dtype.
  """
  tx = train.make_optimizer(train_cfg)
  schedule = train.make_schedule(train_cfg)
  if distill is not None:  # loss schedules with steps=0 span the phase
    distill = distill.resolved(int(train_cfg.steps))
  # With feature distillation between widths the state also holds the learned projection.
  state, state_shardings = train.create_train_state(
      model_cfg, tx, seed, mesh, rules, t_cfg=teacher and teacher.cfg, distill=distill)
  ckpts = checkpoint.PhaseCheckpoints(os.path.join(phase_dir, "checkpoints"),
                                      max_to_keep=keep_checkpoints)
  data_iter = make_train_iter()
  restored = ckpts.restore_latest_valid(state, state_shardings)
  start = 0
  if restored is None and init_params is not None:
    state = state.replace(params=init_params())
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
                            grad_accum_steps=int(train_cfg.get("grad_accum_steps", 1)),
                            rules=rules, t_rules=teacher and (teacher.rules or rules)),
      state_shardings, teacher.shardings if teacher else None, mesh)
  teacher_params = teacher.params if teacher else None
  batch_sharding = sharding.batch_sharding(mesh)
  # Every process computes the same replicated metrics; only process 0 writes them.
  log = MetricLog(phase_dir, phase=phase, start_step=start, total_steps=total,
                  tokens_per_step=tokens_per_step, show_progress=show_progress,
                  enabled=jax.process_index() == 0, wandb=config_dict.get("wandb"),
                  config=config_dict)
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
        stop = signals.check()
        if step % checkpoint_every == 0 or step == total or stop:
          # The iterator state is taken after this step's batch, so a resume continues after it.
          if val_loss_fn is not None and not stop:
            val_losses[step] = val_loss_fn(state.params)
          ckpts.save(step, state, data_iter.get_state(), config_dict, val_losses.get(step))
          last_saved = step
        if stop:
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
