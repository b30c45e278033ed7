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

from kdjax import checkpoint, optim, sharding, train
from kdjax.metric_log import MetricLog
from kdjax.model import ModelConfig
from kdjax.settings import DistillSettings
from kdjax.state import abstract_train_state, create_train_state, lora_seed_base


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


@dataclasses.dataclass(frozen=True)
class PhaseSpec:
  """Everything one phase's training needs; `train_phase(spec)` runs it.

  `val_loss_fn(params)`, if given, is evaluated at each checkpoint: it decides which checkpoint is
  kept as the best and is logged as `val_loss` in that step's metrics row. `init_params()`, if
  given, replaces the seed's random params at step 0 (e.g. a student pruned from the teacher); it
  must return them in the state's shardings and dtype.
  """

  phase: str  # 'teacher', 'distilled', 'scratch' or an ablation point's name
  phase_dir: str  # metrics.jsonl, tensorboard/ and checkpoints/ live here
  model_cfg: ModelConfig
  train_cfg: Any  # settings.TrainSettings, or a section with its fields (kdjax.optim)
  seed: int
  mesh: Any
  rules: Any
  make_train_iter: Callable[[], Iterator]  # endless batches with get_state/set_state
  tokens_per_step: int
  config_dict: dict  # the run's config, saved with every checkpoint
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int
  nonfinite_patience: int
  teacher: Teacher | None = None
  distill: DistillSettings | None = None
  val_loss_fn: Callable[[Any], float] | None = None
  init_params: Callable[[], Any] | None = None
  show_progress: bool = True


def _restore_or_init(spec: PhaseSpec, tx, distill, ckpts: checkpoint.PhaseCheckpoints):
  """(start step, state, state shardings, data state or None). A checkpoint is restored into the
  abstract state, so resuming never holds a fresh state next to the restored one."""
  t_cfg = spec.teacher.cfg if spec.teacher else None
  restored = None
  if ckpts.latest_step() is not None:
    like, shardings = abstract_train_state(spec.model_cfg, tx, spec.seed, spec.mesh, spec.rules,
                                           t_cfg=t_cfg, distill=distill)
    # A LoRA student's frozen base is not in its checkpoints (kdjax.lora).
    restored = ckpts.restore_latest_valid(like.replace(frozen_params=None),
                                          shardings.replace(frozen_params=None))
  if restored is not None:
    start, state, data_state = restored
    if spec.model_cfg.lora.rank:
      state = state.replace(frozen_params=_lora_base(spec))
    return start, state, shardings, data_state
  state, shardings = create_train_state(spec.model_cfg, tx, spec.seed, spec.mesh, spec.rules,
                                        t_cfg=t_cfg, distill=distill)
  if spec.init_params is not None:  # a LoRA student's init is its frozen base
    state = state.replace(**{"frozen_params" if spec.model_cfg.lora.rank else "params":
                             spec.init_params()})
  return 0, state, shardings, None


def _lora_base(spec: PhaseSpec):
  """A LoRA student's frozen base, as it was at step 0: `init_params()`, or the seed's init."""
  if spec.init_params is not None:
    return spec.init_params()
  return lora_seed_base(spec.model_cfg, spec.seed, spec.mesh, spec.rules)


def train_phase(spec: PhaseSpec) -> PhaseResult:
  """Trains `spec.model_cfg` for `spec.train_cfg.steps`, resuming from the phase's latest
  checkpoint.

  Raises Preempted after checkpointing if SIGTERM/SIGINT arrives, and NonFiniteError after
  `nonfinite_patience` consecutive skipped (non-finite) steps, leaving the last checkpoint intact.
  """
  phase, phase_dir, mesh, rules, teacher = (spec.phase, spec.phase_dir, spec.mesh, spec.rules,
                                            spec.teacher)
  tx, schedule = optim.make_optimizer(spec.train_cfg), optim.make_schedule(spec.train_cfg)
  total = int(spec.train_cfg.steps)
  # Loss schedules with steps=0 span the phase.
  distill = spec.distill.resolved(total) if spec.distill is not None else None
  ckpts = checkpoint.PhaseCheckpoints(os.path.join(phase_dir, "checkpoints"),
                                      max_to_keep=spec.keep_checkpoints)
  data_iter = spec.make_train_iter()
  try:
    start, state, state_shardings, data_state = _restore_or_init(spec, tx, distill, ckpts)
  except BaseException:
    ckpts.close()
    raise
  if data_state is not None:
    data_iter.set_state(data_state)
    if start < total:
      print(f"{phase}: resuming from step {start}", file=sys.stderr)
  if start >= total:
    ckpts.close()
    return PhaseResult(model_params(state), start, 0)
  step_fn = train.jit_train_step(
      train.make_train_step(spec.model_cfg, tx, schedule, t_cfg=teacher and teacher.cfg,
                            distill=distill,
                            grad_accum_steps=int(spec.train_cfg.grad_accum_steps),
                            rules=rules, t_rules=teacher and (teacher.rules or rules),
                            loss_chunk_size=int(getattr(spec.train_cfg, "loss_chunk_size", 0))),
      state_shardings, teacher.shardings if teacher else None, mesh)
  # Every process computes the same replicated metrics; only process 0 writes them.
  log = MetricLog(phase_dir, phase=phase, start_step=start, total_steps=total,
                  tokens_per_step=spec.tokens_per_step, show_progress=spec.show_progress,
                  enabled=jax.process_index() == 0, wandb=spec.config_dict.get("wandb"),
                  config=spec.config_dict)
  try:
    state = _run_steps(spec, step_fn, state, data_iter, ckpts, log, start, total)
  finally:
    ckpts.wait()
    ckpts.close()
    log.close()
  return PhaseResult(model_params(state), total, total - start)


def model_params(state) -> Any:
  """The params the student's model reads: a LoRA student's adapters with its frozen base."""
  return train.model_params(state.params, state.frozen_params)


def _run_steps(spec: PhaseSpec, step_fn, state, data_iter, ckpts, log, start: int, total: int):
  """Steps start+1 .. total: dispatch, settle the previous step's metrics, checkpoint, stop on a
  signal. Returns the final state."""
  phase, teacher = spec.phase, spec.teacher
  teacher_params = teacher.params if teacher else None
  batch_sharding = sharding.batch_sharding(spec.mesh)
  last_saved = start
  val_losses = {}  # step -> held-out loss, merged into that step's metrics row
  previous = None  # (step, device metrics) of the step before the one just dispatched

  def settle(step_metrics):
    """Host side of a finished step: log it if due, stop on too many non-finite steps."""
    done_step, device_metrics = step_metrics
    if done_step % spec.log_every == 0 or done_step == total or done_step in val_losses:
      row = jax.device_get(device_metrics)
      if done_step in val_losses:
        row = dict(row, val_loss=val_losses.pop(done_step))
      log.write(done_step, row)
    if int(jax.device_get(device_metrics["nonfinite_streak"])) >= spec.nonfinite_patience:
      raise NonFiniteError(
          f"{phase}: {spec.nonfinite_patience} consecutive steps up to step {done_step} had a "
          f"non-finite loss or gradient; their updates were skipped and the last checkpoint "
          f"(step {last_saved}) is intact. Lower the learning rate, check the data, or raise "
          "config.nonfinite_patience.")

  with _StopSignals() as signals:
    for step in range(start + 1, total + 1):
      batch = device_batch(next(data_iter), batch_sharding)
      state, metrics = step_fn(state, teacher_params, batch)
      if previous is not None:
        settle(previous)  # reads step N-1 while step N runs
      previous = (step, metrics)  # not the state: its buffers are donated to the next step
      stop = signals.check()
      if step % spec.checkpoint_every == 0 or step == total or stop:
        # The iterator state is taken after this step's batch, so a resume continues after it.
        if spec.val_loss_fn is not None and not stop:
          val_losses[step] = spec.val_loss_fn(model_params(state))
        ckpts.save(step, state, data_iter.get_state(), spec.config_dict, val_losses.get(step))
        last_saved = step
      if stop:
        settle(previous)
        ckpts.wait()
        raise Preempted(f"{phase}: received {signal.Signals(signals.received).name}; saved a "
                        f"checkpoint at step {step} in {spec.phase_dir}. Rerun the same command "
                        "to resume.")
    settle(previous)
  return state
