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

from kdjax import sweep_stats

# An ablation point's row (one per point and seed): what it is, then its held-out metrics
# (kdjax.evaluate) on the validation split (val_*, what picks a winner) and the test split
# (test_*, what is reported).
METRICS = ("ppl", "loss", "accuracy", "top1_agreement", "top5_agreement", "kl_to_teacher", "ece")
COLUMNS = (("name", "group", "phase", "seed", "overrides", "params", "train_tokens")
           + tuple(f"{split}_{m}" for split in ("val", "test") for m in METRICS))


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


def _group_table(group: list[sweep_stats.PointStats]) -> list[str]:
  winner = sweep_stats.best(group)
  lines = ["| point | phase | params | train tokens | seeds | val ppl | test ppl | test ppl − "
           f"{winner.name} (paired) | top-1 agr. | top-5 agr. | KL | ECE |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for p in group:
    mark = " ★" if p is winner else ""
    diff = "—" if p is winner else sweep_stats.paired(p, winner).format()
    first = p.rows[0]
    lines.append(
        f"| {p.name}{mark} | {p.phase} | {int(first['params']):,} | "
        f"{int(first['train_tokens']):,} | {p.metric('val_ppl').n} | "
        f"{p.metric('val_ppl').format()} | {p.metric('test_ppl').format()} | {diff} | "
        + " | ".join(p.metric(f"test_{k}").format(4)
                     for k in ("top1_agreement", "top5_agreement", "kl_to_teacher", "ece"))
        + " |")
  return lines


def _pairs_table(stats: list[sweep_stats.PointStats]) -> list[str]:
  lines = ["### distilled − scratch, paired by seed", "",
           "| group | point | distilled test ppl | scratch test ppl | difference | relative | "
           "per seed |", "|---|---|---|---|---|---|---|"]
  found = False
  for name, group in sweep_stats.groups(stats).items():
    for d, s in sweep_stats.distilled_scratch_pairs(group):
      found = True
      diff, rel = sweep_stats.paired(d, s), sweep_stats.paired(d, s, relative=True)
      pct = sweep_stats.Spread(tuple(100 * v for v in rel.values))
      per_seed = ", ".join(f"{v:+.2f}" for v in diff.values)
      lines.append(f"| {name or 'points'} | {sweep_stats.overrides_label(d)} | "
                   f"{d.metric('test_ppl').format()} | {s.metric('test_ppl').format()} | "
                   f"{diff.format()} | {pct.format(1)}% | {per_seed} |")
  return lines + [""] if found else []


def results_markdown(rows: list[dict[str, Any]]) -> str:
  """A table per group (mean ± sample sd over seeds; ★ marks the lowest mean validation
  perplexity), then the paired distilled − scratch differences."""
  stats = sweep_stats.points(rows)
  seeds = sorted({int(r["seed"]) for r in rows})
  lines = [f"Seeds {', '.join(map(str, seeds))}: mean ± sample standard deviation over seeds. "
           "★ = the group's lowest mean validation perplexity (what chooses); the other columns "
           "are on the test split. Paired differences are taken seed by seed.", ""]
  for name, group in sweep_stats.groups(stats).items():
    lines += [f"### {name or 'points'}", ""] + _group_table(group) + [""]
  return "\n".join(lines + _pairs_table(stats))


def write_results(workdir: str, rows: list[dict[str, Any]]) -> dict[str, str]:
  """Writes results.csv, results.md and timings.csv of a sweep's finished points (in sweep
  order) to `workdir` (process 0 only); returns their paths by name."""
  paths = {name: os.path.join(workdir, name)
           for name in ("results.csv", "results.md", "timings.csv")}
  if jax.process_index() != 0:
    return paths
  table = results_csv(rows)
  write_text(paths["results.csv"], table)
  # The markdown is computed from the CSV as written, so it follows from results.csv alone.
  write_text(paths["results.md"], results_markdown(list(csv.DictReader(io.StringIO(table)))))
  write_text(paths["timings.csv"], "name,seed,run,seconds\n" + "".join(
      f"{r['name']},{r['seed']},{r['run']},{r.get('seconds', '')}\n" for r in rows))
  return paths
