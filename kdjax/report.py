"""Tables printed and written: the experiment's held-out summary and an ablation sweep's results.

Every file is written atomically (a temporary file, then a rename), so a reader never sees half of
one, and holds deterministic values only, so a rerun on CPU writes the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

import jax

# An ablation point's row: what it is, then its held-out metrics (kdjax.evaluate).
COLUMNS = ("name", "group", "phase", "overrides", "params", "train_tokens", "ppl", "loss",
           "accuracy", "top1_agreement", "top5_agreement", "kl_to_teacher", "ece")


def write_text(path: str, text: str) -> None:
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def write_json(path: str, value: Any) -> None:
  write_text(path, json.dumps(value, indent=2, sort_keys=True))


def format_table(summary: dict[str, dict[str, float]]) -> str:
  """One line per model of the experiment's summary (experiment.evaluate_phases)."""
  lines = [f"{'model':<10} {'params':>9} {'ppl':>9} {'top1_agree':>10} {'top5_agree':>10} "
           f"{'kl_to_teacher':>13} {'ece':>7} {'weight_bytes':>12}"]
  for name, m in summary.items():
    lines.append(f"{name:<10} {m['params']:>9,d} {m['ppl']:>9.2f} {m['top1_agreement']:>10.4f} "
                 f"{m['top5_agreement']:>10.4f} {m['kl_to_teacher']:>13.4f} {m['ece']:>7.4f} "
                 f"{int(m.get('weight_bytes', 0)):>12,d}")
  return "\n".join(lines)


def write_summary(workdir: str, summary: dict[str, dict[str, float]],
                  samples: dict[str, list[str]]) -> str:
  """Writes `<workdir>/summary.json` and prints the table and each model's sampled lines;
  returns the file's path."""
  path = os.path.join(workdir, "summary.json")
  write_json(path, summary)
  print("\n" + format_table(summary))
  for phase, lines in samples.items():
    print(f"\n--- samples: {phase} ---")
    for line in lines:
      print(repr(line))
  print(f"\nwrote {path}")
  return path


def _cell(value: Any) -> str:
  return f"{value:.6f}" if isinstance(value, float) else str(value)


def results_csv(rows: list[dict[str, Any]]) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(COLUMNS)
  for r in rows:
    writer.writerow([_cell(r.get(k, "")) for k in COLUMNS])  # a row may lack a metric
  return buffer.getvalue()


def results_markdown(rows: list[dict[str, Any]]) -> str:
  """A table per group: the point, its phase, and its held-out metrics."""
  lines = []
  for group in dict.fromkeys(r["group"] for r in rows):
    lines += [f"### {group or 'points'}", "",
              "| point | phase | params | train tokens | ppl | top-1 agr. | top-5 agr. | KL | ECE |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["group"] == group):
      lines.append(f"| {r['name']} | {r['phase']} | {r['params']:,} | {r['train_tokens']:,} | "
                   f"{r['ppl']:.2f} | {r['top1_agreement']:.4f} | {r['top5_agreement']:.4f} | "
                   f"{r['kl_to_teacher']:.4f} | {r['ece']:.4f} |")
    lines.append("")
  return "\n".join(lines)


def write_results(workdir: str, rows: list[dict[str, Any]]) -> dict[str, str]:
  """Writes results.csv, results.md and timings.csv of a sweep's finished points (in sweep
  order) to `workdir` (process 0 only); returns their paths by name."""
  paths = {name: os.path.join(workdir, name)
           for name in ("results.csv", "results.md", "timings.csv")}
  if jax.process_index() != 0:
    return paths
  write_text(paths["results.csv"], results_csv(rows))
  write_text(paths["results.md"], results_markdown(rows))
  write_text(paths["timings.csv"], "name,run,seconds\n" + "".join(
      f"{r['name']},{r['run']},{r.get('seconds', '')}\n" for r in rows))
  return paths
