"""Per-phase metric logging: metrics.jsonl, TensorBoard event files, a progress bar (steps,
tokens/s, ETA) and, when enabled in the config and installed, Weights & Biases."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from typing import Any

import tqdm
from tensorboardX import SummaryWriter


def truncate_jsonl(path: str, last_step: int) -> None:
  """Drops rows logged after `last_step`, so a resumed run never holds a step twice."""
  if not os.path.exists(path):
    return
  rows = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= last_step:
          rows.append(line)
      except (ValueError, KeyError, TypeError):
        pass  # a line torn by a kill mid-write: drop it, the step will be logged again
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(rows)
  os.replace(tmp, path)


class MetricLog:
  """Writes one JSON object per logged step (with `step` and `loss`) and TensorBoard scalars.

  With `enabled=False` (every process but 0 of a multi-host run) it writes nothing at all.
  `wandb` (config.wandb: enabled, project, entity, group) also logs every row to a Weights &
  Biases run named after the phase, with `config` as its config; its id comes from the phase
  directory, so a resumed phase continues the same run.
  """

  def __init__(self, phase_dir: str, *, phase: str, start_step: int, total_steps: int,
               tokens_per_step: int, show_progress: bool = True, enabled: bool = True,
               wandb: dict[str, Any] | None = None, config: dict[str, Any] | None = None):
    self.enabled = enabled
    self._wandb = None
    if not enabled:
      return
    os.makedirs(phase_dir, exist_ok=True)
    self.path = os.path.join(phase_dir, "metrics.jsonl")
    truncate_jsonl(self.path, start_step)
    self._file = open(self.path, "a")
    self._tb = SummaryWriter(os.path.join(phase_dir, "tensorboard"), purge_step=start_step + 1)
    self._tokens_per_step = tokens_per_step
    self._last = (start_step, time.perf_counter())
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, desc=phase, unit="step",
                          dynamic_ncols=True, disable=not show_progress, file=sys.stderr,
                          mininterval=1.0)
    if wandb and wandb.get("enabled"):
      import wandb as wandb_lib  # config_check refuses enabled=True where it is not installed
      run_id = hashlib.sha256(os.path.abspath(phase_dir).encode()).hexdigest()[:16]
      self._wandb = wandb_lib.init(
          project=wandb.get("project") or "kdjax", entity=wandb.get("entity") or None,
          group=wandb.get("group") or None, name=phase, id=run_id, resume="allow",
          dir=phase_dir, config=config or {})

  def write(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
    """Logs host-side scalars for `step`; adds tokens/s since the previous write."""
    if not self.enabled:
      return {}
    row = {"step": int(step)}
    row.update({k: float(v) for k, v in metrics.items()})
    now = time.perf_counter()
    last_step, last_time = self._last
    if step > last_step:
      row["tokens_per_sec"] = (step - last_step) * self._tokens_per_step / (now - last_time)
    self._last = (step, now)
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    for k, v in row.items():
      if k != "step" and math.isfinite(v):
        self._tb.add_scalar(f"train/{k}", v, step)
    if self._wandb is not None:
      self._wandb.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=int(step))
    self._bar.update(step - self._bar.n)
    postfix = {"loss": f"{row['loss']:.3f}"}
    if "tokens_per_sec" in row:
      postfix["tok/s"] = f"{row['tokens_per_sec']:.0f}"
    self._bar.set_postfix(postfix, refresh=False)
    return row

  def close(self) -> None:
    if not self.enabled:
      return
    self._bar.close()
    self._file.close()
    self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()
