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

from kdjax import sweep_stats

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


def _overrides(p: sweep_stats.PointStats) -> dict[str, Any]:
  return json.loads(p.overrides)


def _errorbar(ax, xs, spreads: Sequence[sweep_stats.Spread], style: str, label: str) -> None:
  """Means with the seeds' sample standard deviation as error bars (none for one seed)."""
  ax.errorbar(xs, [s.mean for s in spreads], yerr=[s.error_bar for s in spreads], fmt=style,
              capsize=3, label=label)


def ppl_vs_temperature(rows: Sequence[Row], path: str, *, key: str = "test_ppl") -> str:
  """Perplexity (mean ± sd over seeds) against temperature (log2 axis), one line per divergence
  and alpha; cross-entropy alone (a scratch point, or alpha = 0) does not read the teacher, so it
  is drawn as a horizontal line with its spread as a band."""
  lines: dict[tuple[str, float], list[tuple[float, sweep_stats.Spread]]] = {}
  ce_only = []
  for p in sweep_stats.points(rows):
    o = _overrides(p)
    if p.phase == "scratch" or float(o.get("distill.alpha", 0.5)) == 0.0:
      ce_only.append(p.metric(key))
      continue
    line = (str(o.get("distill.loss", "forward_kl")), float(o.get("distill.alpha", 0.5)))
    lines.setdefault(line, []).append((float(o.get("distill.temperature", 1.0)), p.metric(key)))
  fig, ax = plt.subplots(figsize=(7.2, 4.4))
  temperatures = sorted({t for pts in lines.values() for t, _ in pts}) or [1.0]
  for s in ce_only:
    ax.axhline(s.mean, color="k", linestyle="--", label="alpha=0 (cross-entropy only)")
    ax.axhspan(s.mean - s.error_bar, s.mean + s.error_bar, color="k", alpha=0.1)
  for (loss, alpha), pts in sorted(lines.items()):
    pts.sort(key=lambda tp: tp[0])
    _errorbar(ax, [t for t, _ in pts], [s for _, s in pts], "o-", f"{loss}, alpha={alpha:g}")
  ax.set_xscale("log", base=2)
  ax.set_xticks(temperatures, [f"{t:g}" for t in temperatures])
  ax.set_xlabel("temperature")
  ax.set_ylabel(f"{key.replace('_', ' ')} (mean ± sd over seeds)")
  ax.set_title("perplexity by divergence, temperature and alpha")
  ax.legend(fontsize=7)
  return _save(fig, path)


def ppl_by_label(rows: Sequence[Row], path: str, *, title: str, key: str = "test_ppl") -> str:
  """A bar per point (mean ± sd over seeds), lowest perplexity first."""
  stats = sorted(sweep_stats.points(rows), key=lambda p: p.metric(key).mean)
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  spreads = [p.metric(key) for p in stats]
  ax.barh([p.name for p in stats], [s.mean for s in spreads],
          xerr=[s.error_bar for s in spreads], capsize=3)
  lo = min((s.mean for s in spreads), default=0.0)
  ax.set_xlim(left=0.9 * lo)
  ax.invert_yaxis()
  ax.set_xlabel(f"{key.replace('_', ' ')} (mean ± sd over seeds)")
  ax.set_title(title)
  return _save(fig, path)


def ppl_vs(rows: Sequence[Row], path: str, *, x_key: str, x_label: str, title: str,
           key: str = "test_ppl", log_x: bool = True) -> str:
  """Perplexity (mean ± sd over seeds) against a numeric column (training tokens, params),
  distilled vs scratch."""
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  stats = sweep_stats.points(rows)
  for phase, style in (("distilled", "o-"), ("scratch", "s--")):
    pts = sorted((float(p.rows[0][x_key]), p.metric(key)) for p in stats if p.phase == phase)
    if pts:
      _errorbar(ax, [x for x, _ in pts], [s for _, s in pts], style, phase)
  if log_x:
    ax.set_xscale("log")
  ax.set_xlabel(x_label)
  ax.set_ylabel(f"{key.replace('_', ' ')} (mean ± sd over seeds)")
  ax.set_title(title)
  ax.legend()
  return _save(fig, path)


def sweep_plots(rows: Sequence[Row], directory: str) -> list[str]:
  """The figures for each group present in `rows` (results.csv rows, one per point and seed):
  perplexity against temperature for the loss cross, against training tokens and params for
  the data-budget and size groups, and a bar chart for any other group."""
  groups: dict[str, list[Row]] = {}
  for r in rows:
    groups.setdefault(r["group"], []).append(r)
  written = []
  for group, members in groups.items():
    path = os.path.join(directory, f"{group or 'points'}.png")
    if group == "loss_temperature_alpha":
      written.append(ppl_vs_temperature(members, path))
    elif group == "data_budget":
      written.append(ppl_vs(members, path, x_key="train_tokens", x_label="student training tokens",
                            title="distilled vs scratch as training tokens grow"))
    elif group == "student_size":
      written.append(ppl_vs(members, path, x_key="params", x_label="student params",
                            title="distilled vs scratch by student size"))
    else:
      written.append(ppl_by_label(members, path, title=f"perplexity: {group or 'points'}"))
  return written
