"""Statistics of a sweep over seeds: mean and sample standard deviation per point, the best point
of each group by validation, and paired differences between points run on the same seeds.

Rows are results.csv rows (kdjax.ablation): one per point and seed, with `name`, `group`, `phase`,
`seed`, `overrides` and the metrics, `val_*` on the validation split and `test_*` on the test
split. A point's winner status is decided on validation alone, so the test numbers that the
README reports are never what chose them.

A paired difference compares two points seed by seed (same seed: same student init, same batches,
same teacher), which removes the variation the seeds share: its spread is the sample standard
deviation of the per-seed differences, over the seeds both points have.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Sequence

import numpy as np

Row = Mapping[str, Any]
SELECT_BY = "val_ppl"  # what picks a group's best point
REPORT = "test_ppl"  # what the paired differences compare


@dataclasses.dataclass(frozen=True)
class Spread:
  """Mean and sample standard deviation (ddof = 1; nan for a single value) of `values`."""

  values: tuple[float, ...]

  @property
  def n(self) -> int:
    return len(self.values)

  @property
  def mean(self) -> float:
    return float(np.mean(self.values)) if self.values else math.nan

  @property
  def sd(self) -> float:
    return float(np.std(self.values, ddof=1)) if self.n > 1 else math.nan

  @property
  def error_bar(self) -> float:
    """The sd as a plot's error bar: zero for a single value."""
    return 0.0 if self.n < 2 else self.sd

  def format(self, digits: int = 2) -> str:
    if not self.values:
      return "—"
    if self.n == 1:
      return f"{self.mean:.{digits}f}"
    return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}"


@dataclasses.dataclass(frozen=True)
class PointStats:
  name: str
  group: str
  phase: str
  overrides: str  # JSON, as in results.csv
  rows: tuple[Row, ...]  # one per seed, in seed order

  @property
  def seeds(self) -> tuple[int, ...]:
    return tuple(int(r["seed"]) for r in self.rows)

  def metric(self, key: str) -> Spread:
    return Spread(tuple(float(r[key]) for r in self.rows if r.get(key, "") != ""))

  def by_seed(self, key: str) -> dict[int, float]:
    return {int(r["seed"]): float(r[key]) for r in self.rows}


def points(rows: Sequence[Row]) -> list[PointStats]:
  """One entry per point, in the order points first appear in `rows`."""
  by_name: dict[str, list[Row]] = {}
  for r in rows:
    by_name.setdefault(r["name"], []).append(r)
  return [PointStats(name, rs[0]["group"], rs[0]["phase"], str(rs[0].get("overrides", "{}")),
                     tuple(sorted(rs, key=lambda r: int(r["seed"]))))
          for name, rs in by_name.items()]


def groups(stats: Sequence[PointStats]) -> dict[str, list[PointStats]]:
  out: dict[str, list[PointStats]] = {}
  for p in stats:
    out.setdefault(p.group, []).append(p)
  return out


def best(group: Sequence[PointStats], key: str = SELECT_BY) -> PointStats:
  """The point with the lowest mean `key` (validation perplexity); the first one on a tie."""
  return min(group, key=lambda p: p.metric(key).mean)


def paired(a: PointStats, b: PointStats, key: str = REPORT, relative: bool = False) -> Spread:
  """Per-seed differences a - b of `key` (or (a - b) / b with `relative`), on the shared seeds."""
  va, vb = a.by_seed(key), b.by_seed(key)
  shared = sorted(set(va) & set(vb))
  return Spread(tuple((va[s] - vb[s]) / (vb[s] if relative else 1.0) for s in shared))


def beyond_noise(diff: Spread) -> bool:
  """A difference larger than its spread: |mean| > sd over at least two seeds."""
  return diff.n > 1 and abs(diff.mean) > diff.sd


def distilled_scratch_pairs(group: Sequence[PointStats]) -> list[tuple[PointStats, PointStats]]:
  """(distilled, scratch) points of a group with the same overrides: the same student and
  budget, with and without the teacher."""
  scratch = {p.overrides: p for p in group if p.phase == "scratch"}
  return [(p, scratch[p.overrides]) for p in group
          if p.phase == "distilled" and p.overrides in scratch]


def overrides_label(p: PointStats) -> str:
  o = json.loads(p.overrides)
  return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in o.items()) or "base"
