"""A sweep's statistics over seeds (kdjax/sweep_stats.py) and its markdown table (kdjax/report.py),
on crafted results tables: mean ± sd against numpy, the best mark follows validation, paired
differences are taken seed by seed."""

import csv
import io
import json
import re

import numpy as np
import pytest

from kdjax import plots, report, sweep_stats


def _row(name, group, phase, seed, val_ppl, test_ppl, overrides=None, **extra):
  row = {k: 0.5 for k in report.COLUMNS}
  row.update(name=name, group=group, phase=phase, seed=seed, params=1000, train_tokens=2000,
             overrides=json.dumps(overrides or {}, sort_keys=True), val_ppl=val_ppl,
             test_ppl=test_ppl)
  row.update(extra)
  return row


def _through_csv(rows):
  """What report.write_results feeds the markdown: the rows as results.csv writes them."""
  return list(csv.DictReader(io.StringIO(report.results_csv(rows))))


# Validation prefers "b" although "a" has the lower test perplexity on every seed.
VAL = {"a": [101.0, 103.0, 102.0], "b": [99.0, 100.0, 98.0], "c": [120.0, 125.0, 130.0]}
TEST = {"a": [90.0, 92.0, 97.0], "b": [95.0, 96.0, 99.5], "c": [110.0, 111.0, 140.0]}
CRAFTED = [_row(n, "g", "distilled", s, VAL[n][s], TEST[n][s], {"x": i})
           for i, n in enumerate(VAL) for s in range(3)]


def test_mean_and_sample_sd_match_numpy():
  stats = {p.name: p for p in sweep_stats.points(_through_csv(CRAFTED))}
  for name, values in TEST.items():
    spread = stats[name].metric("test_ppl")
    assert spread.n == 3
    np.testing.assert_allclose(spread.mean, np.mean(values), rtol=1e-12)
    np.testing.assert_allclose(spread.sd, np.std(values, ddof=1), rtol=1e-12)
  one = sweep_stats.Spread((4.0,))
  assert one.format() == "4.00" and np.isnan(one.sd)  # no spread from a single seed


def test_the_best_mark_follows_validation_not_test():
  stats = sweep_stats.points(_through_csv(CRAFTED))
  assert sweep_stats.best(stats).name == "b"
  assert min(stats, key=lambda p: p.metric("test_ppl").mean).name == "a"
  md = report.results_markdown(_through_csv(CRAFTED))
  marked = [line for line in md.splitlines() if "★" in line and line.startswith("|")]
  assert len(marked) == 1 and marked[0].startswith("| b ★ |")
  # Swap the validation numbers of a and b: the mark moves with them, the test columns stay.
  swapped = [dict(r, val_ppl=VAL[{"a": "b", "b": "a"}.get(r["name"], r["name"])][r["seed"]])
             for r in CRAFTED]
  md = report.results_markdown(_through_csv(swapped))
  assert [line for line in md.splitlines() if "★ |" in line][0].startswith("| a ★ |")


def test_paired_differences_are_per_seed():
  stats = {p.name: p for p in sweep_stats.points(_through_csv(CRAFTED))}
  diff = sweep_stats.paired(stats["a"], stats["b"])
  per_seed = np.subtract(TEST["a"], TEST["b"])
  np.testing.assert_allclose(diff.values, per_seed)
  np.testing.assert_allclose(diff.sd, np.std(per_seed, ddof=1), rtol=1e-12)
  # Pairing removes the shared seed effect: c - a has a large unpaired spread but the per-seed
  # differences vary less.
  c_minus_a = sweep_stats.paired(stats["c"], stats["a"])
  assert c_minus_a.sd < stats["c"].metric("test_ppl").sd
  assert sweep_stats.beyond_noise(c_minus_a) and not sweep_stats.beyond_noise(
      sweep_stats.Spread((1.0, -1.5, 0.2)))
  md = report.results_markdown(_through_csv(CRAFTED))
  line = next(line for line in md.splitlines() if line.startswith("| a |"))
  assert f"{per_seed.mean():.2f} ± {np.std(per_seed, ddof=1):.2f}" in line


def test_distilled_minus_scratch_pairs_by_overrides_and_seed():
  rows = []
  for s, (d, sc) in enumerate([(140.0, 170.0), (150.0, 168.0), (139.0, 166.0)]):
    rows += [_row("m_distilled", "size", "distilled", s, d, d, {"w": 96}),
             _row("m_scratch", "size", "scratch", s, sc, sc, {"w": 96}),
             _row("s_distilled", "size", "distilled", s, d + 50, d + 50, {"w": 64})]
  stats = sweep_stats.points(_through_csv(rows))
  pairs = sweep_stats.distilled_scratch_pairs(stats)
  assert [(d.name, s.name) for d, s in pairs] == [("m_distilled", "m_scratch")]  # s has none
  md = report.results_markdown(_through_csv(rows))
  pair_line = next(line for line in md.splitlines() if line.startswith("| size | w=96 |"))
  diffs = np.array([140 - 170, 150 - 168, 139 - 166], float)
  rel = 100 * diffs / np.array([170, 168, 166.0])
  assert f"{diffs.mean():.2f} ± {diffs.std(ddof=1):.2f}" in pair_line
  assert f"{rel.mean():.1f} ± {rel.std(ddof=1):.1f}%" in pair_line
  assert re.search(r"\+?-30\.00, -18\.00, -27\.00", pair_line)


@pytest.mark.parametrize("group", ["loss_temperature_alpha", "student_size", "data_budget", "x"])
def test_plots_draw_every_group_with_error_bars(tmp_path, group):
  rows = []
  for s in range(2):
    for i, (loss, t, a) in enumerate([("forward_kl", 1.0, 1.0), ("forward_kl", 2.0, 1.0),
                                      ("tvd", 1.0, 0.5), ("forward_kl", 1.0, 0.0)]):
      o = {"distill.loss": loss, "distill.temperature": t, "distill.alpha": a}
      for phase in ("distilled", "scratch"):
        rows.append(_row(f"p{i}_{phase}", group, phase, s, 100 + i + s, 100 + i + s, o,
                         params=1000 * (i + 1), train_tokens=2000 * (i + 1)))
  written = plots.sweep_plots(_through_csv(rows), str(tmp_path))
  assert len(written) == 1
  with open(written[0], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
