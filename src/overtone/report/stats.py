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

A table makes many such comparisons (rows x metrics), and at 95% one in twenty differences that are
pure noise still gets its ``*``. Each comparison's p-value is the two-sided p-value of the same t
statistic as its interval (mean / standard error, t with n − 1 degrees of freedom), so p < 0.05 exactly
when the interval excludes 0; ``holm_family`` corrects a table's comparisons together with Holm's
step-down procedure at a family-wise error rate of 5% and marks the survivors ``†``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from scipy import stats

TIE = 1e-9


MIN_UNITS = 3  # independent units below which no interval is given (a t-interval over 2 says nothing)
ALPHA = 0.05  # the per-comparison level of the 95% intervals, and the family-wise level of Holm's correction


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
    p_value: float = math.nan  # two-sided, of the interval's t statistic; NaN without an interval
    holm: bool = False  # significant after Holm's correction over its table's comparisons (``holm_family``)

    @property
    def tested(self) -> bool:
        """Whether this difference has an interval, so it counts as one of its table's comparisons."""
        return self.n >= MIN_UNITS

    @property
    def significant(self) -> bool:
        return self.tested and abs(self.mean) > self.half_width

    def __str__(self) -> str:
        if self.n < MIN_UNITS:  # two chunks that happen to agree would give a zero-width "interval"
            return f"{self.mean:+.2f} (no interval: {self.n} {self.unit}{'s' if self.n != 1 else ''})"
        return f"{self.mean:+.2f} ± {self.half_width:.2f}"

    @property
    def marked(self) -> str:
        """As printed in tables: ``str``, a ``*`` when the interval excludes 0, a ``†`` when the difference is
        significant after Holm's correction over its table."""
        return str(self) + ("*" if self.significant else "") + ("†" if self.holm else "")


def _value(record: dict[str, Any], metric: str) -> float | None:
    value = record["post"].get(metric)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _unit(record: dict[str, Any], by_case: bool = False) -> Any:
    """What a case's result is independent of others by: its chunk in continual editing, else itself; ``by_case``:
    itself always (the cases of a stream, which share its model: an optimistic unit, asked for by name)."""
    return ("chunk", record["chunk"]) if "chunk" in record and not by_case else ("case", record["case_id"])


def paired_contributions(
    base: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]], metric: str, by_case: bool = False
) -> tuple[dict[Any, float], int]:
    """Per independent unit, its share of the difference of the column means (x100), and the paired cases.

    The shares sum, over units, to (column of ``other``) − (column of ``base``) times the number of
    units, with columns computed as ``summarize`` computes them on the paired cases; for ``"avg"``,
    to the difference of the rows' Avg. (the mean of the metric columns) times the number of units.
    """
    by_id = {r["case_id"]: r for r in base}
    pairs = [(by_id[r["case_id"]], r) for r in other if r["case_id"] in by_id]
    metrics = [metric] if metric != "avg" else list(dict.fromkeys(m for _, r in pairs for m in r["post"]))
    units = {_unit(o, by_case) for _, o in pairs}
    shares: dict[Any, float] = dict.fromkeys(units, 0.0)
    columns = 0
    for m in metrics:
        # differences per chunk (or case) for the cases that have this metric in both runs
        per_unit: dict[Any, list[float]] = defaultdict(list)
        for b, o in pairs:
            a, c = _value(b, m), _value(o, m)
            if a is not None and c is not None:
                per_unit[_unit(o, by_case)].append(100.0 * (c - a))
        if not per_unit:
            continue
        columns += 1
        for unit, diffs in per_unit.items():
            # column mean = mean over units of the unit's mean: unit u contributes mean(diffs) / |units with m|
            shares[unit] += len(units) * (sum(diffs) / len(diffs)) / len(per_unit)
    if columns == 0:
        return {}, 0
    return {u: s / columns for u, s in shares.items()}, len(pairs)


def _p_value(mean: float, error: float, n: int) -> float:
    """Two-sided p-value of the paired t statistic mean / error with n - 1 degrees of freedom."""
    if error == 0:  # every unit differs by the same amount: certain, unless that amount is 0
        return 1.0 if abs(mean) <= TIE else 0.0
    return float(2 * stats.t.sf(abs(mean) / error, n - 1))


def paired_difference(
    base: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]], metric: str, by_case: bool = False
) -> PairedDifference:
    """Difference ``other - base`` on the cases both runs finished, equal to the difference of their columns."""
    shares, cases = paired_contributions(base, other, metric, by_case)
    values = list(shares.values())
    n = len(values)
    unit = "chunk" if any(u[0] == "chunk" for u in shares) else "case"
    if n == 0:
        return PairedDifference(metric, math.nan, math.nan, 0, 0, 0, 0, 0, unit)
    mean = sum(values) / n
    half, p = math.inf, math.nan
    if n >= MIN_UNITS:
        error = math.sqrt(sum((d - mean) ** 2 for d in values) / (n - 1)) / math.sqrt(n)
        half = float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * error
        p = _p_value(mean, error, n)
    wins = sum(d > TIE for d in values)
    losses = sum(d < -TIE for d in values)
    return PairedDifference(metric, mean, half, n, wins, n - wins - losses, losses, cases, unit, p)


def paired_differences(
    base: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]], metrics: Sequence[str] | None = None,
    by_case: bool = False,
) -> dict[str, PairedDifference]:
    """Differences for ``metrics`` (default: every metric the records have, then Avg.)."""
    if metrics is None:
        metrics = [*dict.fromkeys(m for r in base for m in r["post"]), "avg"]
    return {m: paired_difference(base, other, m, by_case) for m in metrics}


def holm(p_values: Sequence[float], alpha: float = ALPHA) -> list[bool]:
    """Holm's step-down procedure: which of m hypotheses to reject at family-wise error rate ``alpha``.

    The p-values are taken in ascending order; the k-th smallest (k = 1..m) is rejected while it is at
    most alpha / (m − k + 1), and the first that is not stops it (it and every larger one are kept).
    """
    m = len(p_values)
    rejected = [False] * m
    for k, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        if not p_values[i] <= alpha / (m - k):
            break
        rejected[i] = True
    return rejected


def holm_family(differences: Sequence[PairedDifference], alpha: float = ALPHA) -> list[PairedDifference]:
    """A table's differences with ``holm`` set, corrected together over the m of them that have an interval."""
    tested = [i for i, d in enumerate(differences) if d.tested]
    out = list(differences)
    for i, rejected in zip(tested, holm([differences[i].p_value for i in tested], alpha), strict=True):
        out[i] = replace(differences[i], holm=rejected)
    return out


def holm_note(differences: Sequence[PairedDifference]) -> str:
    """The caption of a table of paired differences: how many comparisons it makes, and what † means."""
    m = sum(d.tested for d in differences)
    return f"{m} comparison{'' if m == 1 else 's'}; † significant after Holm's correction over them (family-wise 5%)."
