"""Paired comparison of two runs over the same cases: is a difference more than noise?

Each case is edited by both runs, so the per-case difference removes the variation between cases.
We report its mean with a 95% t-interval and the counts of cases where the second run wins, ties and
loses. A case's Avg. is the mean of the metrics it has (the metrics of its benchmark's table).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats

TIE = 1e-9


@dataclass(frozen=True)
class PairedDifference:
    """Mean of (other - base) over paired cases, x100, with a 95% interval half-width."""

    metric: str
    mean: float
    half_width: float
    n: int
    wins: int
    ties: int
    losses: int

    @property
    def significant(self) -> bool:
        return self.n > 1 and abs(self.mean) > self.half_width

    def __str__(self) -> str:
        return f"{self.mean:+.2f} ± {self.half_width:.2f}"


def case_value(record: dict[str, Any], metric: str) -> float | None:
    post = record["post"]
    if metric == "avg":
        present = [v for v in post.values() if v is not None]
        return sum(present) / len(present) if present else None
    return post.get(metric)


def paired_difference(
    base: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]], metric: str
) -> PairedDifference:
    """Difference ``other - base`` on the cases both runs finished and both have the metric for."""
    by_id = {r["case_id"]: r for r in base}
    diffs = []
    for record in other:
        if record["case_id"] not in by_id:
            continue
        a, b = case_value(by_id[record["case_id"]], metric), case_value(record, metric)
        if a is not None and b is not None:
            diffs.append(100.0 * (b - a))
    n = len(diffs)
    if n == 0:
        return PairedDifference(metric, math.nan, math.nan, 0, 0, 0, 0)
    mean = sum(diffs) / n
    if n > 1:
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    else:
        half = math.inf
    wins = sum(d > TIE for d in diffs)
    losses = sum(d < -TIE for d in diffs)
    return PairedDifference(metric, mean, half, n, wins, n - wins - losses, losses)


def paired_differences(
    base: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]], metrics: Sequence[str] | None = None
) -> dict[str, PairedDifference]:
    """Differences for ``metrics`` (default: every metric the records have, then Avg.)."""
    if metrics is None:
        metrics = [*dict.fromkeys(m for r in base for m in r["post"]), "avg"]
    return {m: paired_difference(base, other, m) for m in metrics}
