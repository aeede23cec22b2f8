"""Paired comparison of two runs over the same cases: is a difference more than noise?

Each case is edited by both runs, so the per-case difference removes the variation between cases.
We report its mean with a 95% t-interval and the counts of units where the second run wins, ties and
loses.

One definition of Avg. everywhere: the paper's, the mean of the table's metric columns, each column
the mean over the cases that have that metric (a continual run: over a chunk's cases, then over
chunks; ``runner.bench.summarize``). The paired difference is built to equal the difference of the
two rows' values on the paired cases: every case's contribution is its differences weighted as the
column means weight them, so on a dataset where some cases lack Gen. or Por. the ΔAvg. is exactly
Avg.(other) − Avg.(base). The interval treats the independent units as the sample: cases in single
editing, chunks in continual editing (the cases of one chunk share an edited model).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats

TIE = 1e-9


MIN_UNITS = 3  # independent units below which no interval is given (a t-interval over 2 says nothing)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of (other - base) over paired units, x100, with a 95% interval half-width."""

    metric: str
    mean: float
    half_width: float
    n: int  # independent units: cases, or chunks of a continual run
    wins: int
    ties: int
    losses: int
    cases: int = 0  # paired cases behind the units
    unit: str = "case"

    @property
    def significant(self) -> bool:
        return self.n >= MIN_UNITS and abs(self.mean) > self.half_width

    def __str__(self) -> str:
        if self.n < MIN_UNITS:  # two chunks that happen to agree would give a zero-width "interval"
            return f"{self.mean:+.2f} (no interval: {self.n} {self.unit}{'s' if self.n != 1 else ''})"
        return f"{self.mean:+.2f} ± {self.half_width:.2f}"

    @property
    def marked(self) -> str:
        """As printed in tables: ``str`` and a ``*`` when the interval excludes 0."""
        return str(self) + ("*" if self.significant else "")


def _value(record: dict[str, Any], metric: str) -> float | None:
    value = record["post"].get(metric)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _unit(record: dict[str, Any]) -> Any:
    """What a case's result is independent of others by: its chunk in continual editing, else itself."""
    return ("chunk", record["chunk"]) if "chunk" in record else ("case", record["case_id"])


def paired_contributions(
    base: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]], metric: str
) -> tuple[dict[Any, float], int]:
    """Per independent unit, its share of the difference of the column means (x100), and the paired cases.

    The shares sum, over units, to (column of ``other``) − (column of ``base``) times the number of
    units, with columns computed as ``summarize`` computes them on the paired cases; for ``"avg"``,
    to the difference of the rows' Avg. (the mean of the metric columns) times the number of units.
    """
    by_id = {r["case_id"]: r for r in base}
    pairs = [(by_id[r["case_id"]], r) for r in other if r["case_id"] in by_id]
    metrics = [metric] if metric != "avg" else list(dict.fromkeys(m for _, r in pairs for m in r["post"]))
    units = {_unit(o) for _, o in pairs}
    shares: dict[Any, float] = dict.fromkeys(units, 0.0)
    columns = 0
    for m in metrics:
        # differences per chunk (or case) for the cases that have this metric in both runs
        per_unit: dict[Any, list[float]] = defaultdict(list)
        for b, o in pairs:
            a, c = _value(b, m), _value(o, m)
            if a is not None and c is not None:
                per_unit[_unit(o)].append(100.0 * (c - a))
        if not per_unit:
            continue
        columns += 1
        for unit, diffs in per_unit.items():
            # column mean = mean over units of the unit's mean: unit u contributes mean(diffs) / |units with m|
            shares[unit] += len(units) * (sum(diffs) / len(diffs)) / len(per_unit)
    if columns == 0:
        return {}, 0
    return {u: s / columns for u, s in shares.items()}, len(pairs)


def paired_difference(
    base: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]], metric: str
) -> PairedDifference:
    """Difference ``other - base`` on the cases both runs finished, equal to the difference of their columns."""
    shares, cases = paired_contributions(base, other, metric)
    values = list(shares.values())
    n = len(values)
    unit = "chunk" if any(u[0] == "chunk" for u in shares) else "case"
    if n == 0:
        return PairedDifference(metric, math.nan, math.nan, 0, 0, 0, 0, 0, unit)
    mean = sum(values) / n
    if n >= MIN_UNITS:
        sd = math.sqrt(sum((d - mean) ** 2 for d in values) / (n - 1))
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    else:
        half = math.inf
    wins = sum(d > TIE for d in values)
    losses = sum(d < -TIE for d in values)
    return PairedDifference(metric, mean, half, n, wins, n - wins - losses, losses, cases, unit)


def paired_differences(
    base: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]], metrics: Sequence[str] | None = None
) -> dict[str, PairedDifference]:
    """Differences for ``metrics`` (default: every metric the records have, then Avg.)."""
    if metrics is None:
        metrics = [*dict.fromkeys(m for r in base for m in r["post"]), "avg"]
    return {m: paired_difference(base, other, m) for m in metrics}
