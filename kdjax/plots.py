"""Plots of a sweep's results (kdjax.ablation) and of training curves, as PNG files.

Every function takes plain data (rows of results.csv as dicts, or metrics.jsonl paths) and a
path to write, so notebooks and scripts draw the same figures. matplotlib runs on its file-only
'Agg' backend: no display is needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

Row = Mapping[str, Any]


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The rows of a metrics.jsonl (torn lines, from a killed run, are skipped)."""
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except ValueError:
        pass
  return rows


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path + ".tmp.png", dpi=110)
  plt.close(fig)
  os.replace(path + ".tmp.png", path)
  return path


def training_curves(curves: Mapping[str, str], path: str, *, key: str = "loss",
                    title: str = "training loss") -> str:
  """One line per run: `key` against step, from {label: metrics.jsonl path}."""
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for label, metrics_path in curves.items():
    rows = [r for r in read_metrics(metrics_path) if key in r]
    ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=label, linewidth=1.2)
  ax.set_xlabel("step")
  ax.set_ylabel(key)
  ax.set_title(title)
  if curves:
    ax.legend(fontsize=7)
  return _save(fig, path)


def _overrides(row: Row) -> dict[str, Any]:
  value = row.get("overrides", "{}")
  return json.loads(value) if isinstance(value, str) else dict(value)


def ppl_vs_temperature(rows: Sequence[Row], path: str, *, base_temperature: float = 1.0,
                       base_alpha: float = 0.5) -> str:
  """Held-out perplexity against temperature (log2 axis), one line per alpha. alpha = 0 does not
  read the teacher, so its one point is drawn as a horizontal line."""
  by_alpha: dict[float, list[tuple[float, float]]] = {}
  for r in rows:
    o = _overrides(r)
    t = float(o.get("distill.temperature", base_temperature))
    by_alpha.setdefault(float(o.get("distill.alpha", base_alpha)), []).append((t, float(r["ppl"])))
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  temperatures = sorted({t for pts in by_alpha.values() for t, _ in pts})
  for alpha, pts in sorted(by_alpha.items()):
    pts = sorted(pts)
    if alpha == 0.0 and len(pts) == 1 and len(temperatures) > 1:
      ax.plot([temperatures[0], temperatures[-1]], [pts[0][1]] * 2, "k--",
              label="alpha=0 (cross-entropy only)")
    else:
      ax.plot([t for t, _ in pts], [p for _, p in pts], "o-", label=f"alpha={alpha:g}")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("temperature")
  ax.set_ylabel("held-out perplexity")
  ax.set_title("perplexity vs temperature and alpha")
  ax.legend(fontsize=8)
  return _save(fig, path)


def ppl_by_label(rows: Sequence[Row], path: str, *, title: str, label_key: str = "name") -> str:
  """A bar per row (e.g. one per divergence), lowest perplexity first."""
  rows = sorted(rows, key=lambda r: float(r["ppl"]))
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  ax.barh([str(r[label_key]) for r in rows], [float(r["ppl"]) for r in rows])
  lo = min(float(r["ppl"]) for r in rows) if rows else 0.0
  ax.set_xlim(left=0.9 * lo)
  ax.invert_yaxis()
  ax.set_xlabel("held-out perplexity")
  ax.set_title(title)
  return _save(fig, path)


def ppl_vs(rows: Sequence[Row], path: str, *, x_key: str, x_label: str, title: str,
           log_x: bool = True) -> str:
  """Perplexity against a numeric column (training tokens, params), distilled vs scratch."""
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for phase, style in (("distilled", "o-"), ("scratch", "s--")):
    pts = sorted((float(r[x_key]), float(r["ppl"])) for r in rows if r["phase"] == phase)
    if pts:
      ax.plot([x for x, _ in pts], [p for _, p in pts], style, label=phase)
  if log_x:
    ax.set_xscale("log")
  ax.set_xlabel(x_label)
  ax.set_ylabel("held-out perplexity")
  ax.set_title(title)
  ax.legend()
  return _save(fig, path)


def sweep_plots(rows: Sequence[Row], directory: str) -> list[str]:
  """The standard figures for each group present in `rows` (results.csv rows)."""
  groups: dict[str, list[Row]] = {}
  for r in rows:
    groups.setdefault(r["group"], []).append(r)
  written = []
  if "temperature_alpha" in groups:
    written.append(ppl_vs_temperature(groups["temperature_alpha"],
                                      os.path.join(directory, "ppl_vs_temperature.png")))
  if "divergence" in groups:
    written.append(ppl_by_label(groups["divergence"], os.path.join(directory,
                                                                   "ppl_by_divergence.png"),
                                title="perplexity by divergence"))
  if "data_budget" in groups:
    written.append(ppl_vs(groups["data_budget"], os.path.join(directory, "data_budget.png"),
                          x_key="train_tokens", x_label="student training tokens",
                          title="distilled vs scratch as training tokens grow"))
  if "student_size" in groups:
    written.append(ppl_vs(groups["student_size"], os.path.join(directory, "student_size.png"),
                          x_key="params", x_label="student params",
                          title="distilled vs scratch by student size"))
  return written

