"""Means over seeds with 95% intervals from a bootstrap over cases and seeds (the tables of a study).

A row of a study is one setting run with S seeds on the same U units: cases in single editing,
chunks in continual editing (the cases of a chunk share an edited model, so they are not independent).
For every seed, a metric's value is the one ``runner.bench.summarize`` gives: the mean over the cases
of a chunk that have the metric, then the mean over chunks; Avg. is the mean of the metric columns.
The row's value is the mean of these over seeds.

The interval is a percentile bootstrap: each of ``REPLICATES`` replicates draws S seeds and U units
with replacement, independently, and computes the same statistic on the drawn seeds x units (the
same units for every drawn seed, so a hard case stays hard in all of them); the interval is the 2.5th
to 97.5th percentile of the replicates. The random draws are seeded, so a table is reproducible. With
one seed (an editor with no random parts) it is the ordinary bootstrap over units.

A paired difference (row B minus row A, e.g. OverTone - CE) is computed per seed on the cases both
rows finished: per unit, B's unit value minus A's, then the same statistic and bootstrap, so the
case-to-case variation common to both rows cancels. Its value equals the difference of the two rows
restricted to those cases (Avg. included). Its two-sided bootstrap p-value is twice the smaller share of
replicates on either side of 0 (at most 1; its resolution is 1 / ``REPLICATES``): below 0.05 when the
95% interval excludes 0 (up to the percentiles' interpolation), and what Holm's correction over a
table's comparisons reads (``report.stats.holm``).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

REPLICATES = 2000
LEVEL = 0.95
RNG_SEED = 0
Records = Sequence[dict[str, Any]]


@dataclass(frozen=True)
class Estimate:
    """A mean (x100) with its 95% bootstrap interval, and what it rests on."""

    mean: float
    low: float
    high: float
    seeds: int
    units: int
    unit: str = "case"
    p_value: float = math.nan  # two-sided bootstrap p-value of "the mean is 0" (a paired difference's test)

    @property
    def has_interval(self) -> bool:
        """False when it rests on one unit of one seed (a single stream, one chunk): resampling it gives back
        the same value, so no interval can be read from it."""
        return self.units * self.seeds > 1

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> bool:
        return self.has_interval and (self.low > 0 or self.high < 0)

    def __str__(self) -> str:
        return f"{self.mean:.2f} ±{self.half_width:.2f}" if self.has_interval else f"{self.mean:.2f} (1 {self.unit})"

    def signed(self) -> str:
        if not self.has_interval:
            return f"{self.mean:+.2f} (no interval: 1 {self.unit})"
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def _unit(record: dict[str, Any]) -> Any:
    return ("chunk", record["chunk"]) if "chunk" in record else ("case", record["case_id"])


def _value(record: dict[str, Any], metric: str) -> float | None:
    value = record["post"].get(metric)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def unit_values(records: Records, metrics: Sequence[str]) -> dict[Any, list[float]]:
    """Per unit, the mean of each metric over its cases that have it (x100; NaN where none has it)."""
    sums: dict[Any, list[list[float]]] = defaultdict(lambda: [[] for _ in metrics])
    for r in records:
        for j, m in enumerate(metrics):
            v = _value(r, m)
            if v is not None:
                sums[_unit(r)][j].append(100.0 * v)
    return {u: [sum(vs) / len(vs) if vs else math.nan for vs in cols] for u, cols in sums.items()}


def _statistic(values: np.ndarray, seeds: np.ndarray, units: np.ndarray) -> np.ndarray:
    """values [S, U, M]; seeds [B, S'] and units [B, U'] index it -> [B, M + 1] (the metrics, then Avg.)."""
    drawn = values[seeds[:, :, None], units[:, None, :]]  # [B, S', U', M]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: a metric no drawn unit has
        columns = np.nanmean(np.nanmean(drawn, axis=2), axis=1)  # per seed over units, then over seeds
        avg = np.nanmean(columns, axis=1, keepdims=True)
    return np.concatenate([columns, avg], axis=1)


def _bootstrap(values: np.ndarray, metrics: Sequence[str], unit: str, replicates: int,
               rng_seed: int) -> dict[str, Estimate | None]:
    n_seeds, n_units, _ = values.shape
    point = _statistic(values, np.arange(n_seeds)[None], np.arange(n_units)[None])[0]
    rng = np.random.default_rng(rng_seed)
    draws = []
    for start in range(0, replicates, 250):  # bounded memory: 250 x S x U x M values at a time
        size = min(250, replicates - start)
        draws.append(_statistic(values, rng.integers(0, n_seeds, (size, n_seeds)),
                                rng.integers(0, n_units, (size, n_units))))
    samples = np.concatenate(draws)
    tail = 100 * (1 - LEVEL) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(samples, tail, axis=0), np.nanpercentile(samples, 100 - tail, axis=0)
        drawn = np.maximum((~np.isnan(samples)).sum(axis=0), 1)
        sides = np.minimum((samples <= 0).sum(axis=0), (samples >= 0).sum(axis=0)) / drawn
    out: dict[str, Estimate | None] = {}
    for j, m in enumerate([*metrics, "avg"]):
        out[m] = None if math.isnan(point[j]) else Estimate(float(point[j]), float(low[j]), float(high[j]),
                                                            n_seeds, n_units, unit, min(1.0, 2 * float(sides[j])))
    return out


def _metrics(runs: Mapping[Any, Records]) -> list[str]:
    return list(dict.fromkeys(m for records in runs.values() for r in records for m in r["post"]))


def _array(per_seed: list[dict[Any, list[float]]], n_metrics: int) -> tuple[np.ndarray, str]:
    units = sorted({u for values in per_seed for u in values}, key=str)
    values = np.full((len(per_seed), len(units), n_metrics), np.nan)
    for s, by_unit in enumerate(per_seed):
        for i, u in enumerate(units):
            if u in by_unit:
                values[s, i] = by_unit[u]
    unit = "chunk" if any(u[0] == "chunk" for u in units) else "case"
    return values, unit


def row_estimates(by_seed: Mapping[Any, Records], metrics: Sequence[str] | None = None,
                  replicates: int = REPLICATES, rng_seed: int = RNG_SEED) -> dict[str, Estimate | None]:
    """Each metric's (and Avg.'s) mean over seeds with its interval; ``by_seed`` maps a seed to its records."""
    metrics = list(metrics) if metrics is not None else _metrics(by_seed)
    runs = [records for records in by_seed.values() if records]
    if not runs:
        return dict.fromkeys([*metrics, "avg"])
    values, unit = _array([unit_values(r, metrics) for r in runs], len(metrics))
    return _bootstrap(values, metrics, unit, replicates, rng_seed)


def paired_estimates(base: Mapping[Any, Records], other: Mapping[Any, Records], metrics: Sequence[str] | None = None,
                     replicates: int = REPLICATES, rng_seed: int = RNG_SEED) -> dict[str, Estimate | None]:
    """``other`` minus ``base`` per metric and Avg., paired by seed and case (seeds both have, cases both finished)."""
    metrics = list(metrics) if metrics is not None else _metrics({**base, **other})
    per_seed = []
    for seed in (s for s in base if s in other):
        common = {r["case_id"] for r in base[seed]} & {r["case_id"] for r in other[seed]}
        if not common:
            continue
        a = unit_values([r for r in base[seed] if r["case_id"] in common], metrics)
        b = unit_values([r for r in other[seed] if r["case_id"] in common], metrics)
        per_seed.append({u: [y - x for x, y in zip(a[u], b[u], strict=True)] for u in a})
    if not per_seed:
        return dict.fromkeys([*metrics, "avg"])
    values, unit = _array(per_seed, len(metrics))
    return _bootstrap(values, metrics, unit, replicates, rng_seed)
