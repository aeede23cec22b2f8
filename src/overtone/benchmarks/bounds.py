"""Bounded cases: at most so many paraphrases, portability and locality probes per case.

A record's probe lists come from a file, and a file may hold anything: one record with 10,000
paraphrases would be evaluated for minutes, in gigabytes, with no sign of progress. So a case holds at
most ``most`` probes of each group (its paraphrases; its portability probes, every kind together; its
locality probes, likewise), 64 by default, far above every shipped benchmark (at most 14 per group). A
case with more is refused naming it and the count (``error``, the default), or keeps its first ``most``
(``cut``), or ``most`` of them drawn without replacement, in their order, from a generator seeded by the
run's seed and the case id (``sample``), so a run and its restart keep the same probes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from typing import TypeVar

from overtone.benchmarks.cases import EditCase, Probe
from overtone.benchmarks.knowedit import DatasetError

MAX_PROBES = 64
PROBE_MODES = ("error", "cut", "sample")
T = TypeVar("T")


def _kept(items: Sequence[T], most: int, mode: str, seed: int, case_id: str, group: str) -> list[int]:
    """The indices of ``items`` a case keeps of one group."""
    if len(items) <= most:
        return list(range(len(items)))
    if mode == "error":
        raise DatasetError(
            f"case {case_id}: {len(items)} {group}, more than --max-probes {most}; keep the first {most} with "
            f"--probes cut, {most} drawn at random with --probes sample, or raise --max-probes")
    if mode == "cut":
        return list(range(most))
    return sorted(random.Random(f"{seed}/{case_id}/{group}").sample(range(len(items)), most))


def _bounded_groups(groups: dict[str, tuple[Probe, ...]], most: int, mode: str, seed: int, case_id: str,
                    group: str) -> dict[str, tuple[Probe, ...]]:
    """Probe groups by kind with at most ``most`` probes over all kinds together; emptied kinds are dropped."""
    flat = [(kind, probe) for kind, probes in groups.items() for probe in probes]
    kept = [flat[i] for i in _kept(flat, most, mode, seed, case_id, group)]
    if len(kept) == len(flat):
        return groups
    out: dict[str, list[Probe]] = {}
    for kind, probe in kept:
        out.setdefault(kind, []).append(probe)
    return {kind: tuple(probes) for kind, probes in out.items()}


def bound_probes(cases: Sequence[EditCase], most: int = MAX_PROBES, mode: str = "error", seed: int = 0
                 ) -> list[EditCase]:
    """``cases`` with at most ``most`` probes per group (module docstring); a ``DatasetError`` naming the first
    case over the bound when ``mode`` is ``error``."""
    if mode not in PROBE_MODES:
        raise ValueError(f"unknown probe mode {mode!r}; choose one of {', '.join(PROBE_MODES)}")
    if most < 1:
        raise ValueError(f"the bound on probes must be >= 1, got {most}")
    out = []
    for case in cases:
        rephrases = [case.rephrases[i] for i in _kept(case.rephrases, most, mode, seed, case.case_id, "paraphrases")]
        portability = _bounded_groups(case.portability, most, mode, seed, case.case_id, "portability probes")
        locality = _bounded_groups(case.locality, most, mode, seed, case.case_id, "locality probes")
        if len(rephrases) == len(case.rephrases) and portability is case.portability and locality is case.locality:
            out.append(case)
        else:
            out.append(replace(case, rephrases=tuple(rephrases), portability=portability, locality=locality))
    return out
