"""Benchmarks: named datasets shipped with the package, read into ``EditCase``s.

A benchmark is a data file plus a loader; adding one is a loader module and one ``register`` call.
Origins and licences of the shipped files are in ``overtone/data/SOURCES.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from overtone.benchmarks.cases import EditCase, Probe
from overtone.benchmarks.counterfact import load_counterfact
from overtone.benchmarks.knowedit import DatasetError, load_knowedit

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class Benchmark:
    name: str
    file: Path
    loader: Callable[[Path], list[EditCase]]
    description: str


BENCHMARKS: dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> None:
    BENCHMARKS[benchmark.name] = benchmark


register(
    Benchmark(
        name="zsre",
        file=DATA_DIR / "knowedit" / "ZsRE" / "ZsRE-test-all.json",
        loader=partial(load_knowedit, prefix="zsre"),
        description="KnowEdit ZsRE test (1301 records): rephrase, Reasoning/Subject_Aliasing/Logical_"
        "Generalization portability, Relation_Specificity locality",
    )
)

register(
    Benchmark(
        name="counterfact",
        file=DATA_DIR / "counterfact" / "counterfact_distracting_neighbor.json",
        loader=partial(load_counterfact, prefix="counterfact"),
        description="CounterFact, ROME format, the toolkit's distracting-neighbour release (804 records): "
        "paraphrases, New_Question portability, Neighborhood and Distracting_Neighborhood locality",
    )
)
register(
    Benchmark(
        name="counterfact-subject-replace",
        file=DATA_DIR / "counterfact" / "counterfact_subject_replace.json",
        loader=partial(load_counterfact, prefix="counterfact-sr"),
        description="CounterFact, ROME format, the toolkit's subject-replace release (213 records): "
        "paraphrases, Subject_Replace portability, Neighborhood locality",
    )
)


def load_benchmark(name: str, limit: int | None = None, offset: int = 0) -> list[EditCase]:
    """Cases ``offset .. offset+limit-1`` of benchmark ``name`` (all from ``offset`` when ``limit`` is None)."""
    if name not in BENCHMARKS:
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(sorted(BENCHMARKS))}")
    if offset < 0 or (limit is not None and limit < 0):
        raise DatasetError(f"offset and limit must be >= 0 (got offset={offset}, limit={limit})")
    bench = BENCHMARKS[name]
    cases = bench.loader(bench.file)
    end = None if limit is None else offset + limit
    return cases[offset:end]


__all__ = ["BENCHMARKS", "Benchmark", "DatasetError", "EditCase", "Probe", "load_benchmark", "register"]
