"""The resolved configuration a run directory records: one definition for ``overtone bench`` and studies.

Everything that changes results is in it (the model's identity, the editor's settings after presets,
the objective, the dataset, the protocol, the seed), so a restart with other settings is refused
(``ResultStore``) and reports can tell runs apart.
"""

from __future__ import annotations

from typing import Any

from overtone.benchmarks import BENCHMARKS, Benchmark
from overtone.editors.base import Editor
from overtone.evaluation.ability import AbilityMonitor
from overtone.evaluation.teacher_forced import Evaluator
from overtone.models.loading import LoadedModel
from overtone.version import __version__, code_identity


def run_config(lm: LoadedModel, editor: Editor, evaluator: Evaluator, bench: Benchmark | None, dataset: str,
               offset: int, limit: int | None, seed: int, threads: int, sequence: int = 1, eval_timing: str = "end",
               batch: int = 1, matched: str | None = None, *, truncate: bool = False,
               ability: AbilityMonitor | None = None, parallel: int = 1, probes: dict[str, Any] | None = None,
               eval_cache: bool = False) -> dict[str, Any]:
    """The ``config.yaml`` of a run of ``editor`` on ``dataset`` (a benchmark name or a file resolved to ``bench``;
    None: ad-hoc facts). ``code`` names the code that made it (``version.code_identity``).

    ``matched``: the run whose per-case update counts this one trains for (matched steps); ``truncate``:
    over-long cases were cut (``--truncate``); ``ability``: the general-ability monitor of continual editing;
    ``parallel``: cases edited at once (recorded, but not a setting that changes results); ``probes``: how
    probes beyond the per-case bound were cut or sampled (``benchmarks.bounds``; None: refused, so none was);
    ``eval_cache``: the unedited model's evaluation was read from the cache where it was there (recorded, but it
    changes no result: each record counts its ``eval_cache_hits``).
    """
    source: dict[str, Any] = {"name": bench.name if bench else "facts", "offset": offset}
    if bench is not None and dataset not in BENCHMARKS:
        source.update(path=str(bench.file), format=bench.format)
    return {
        "overtone_version": __version__,
        "code": code_identity(),
        "protocol": "single" if sequence == 1 else "continual" if batch == 1 else "batch",
        **({"sequence": sequence, "eval_timing": eval_timing} if sequence > 1 else {}),
        **({"batch": batch} if batch > 1 else {}),
        **({"matched_steps": matched} if matched else {}),
        "model": lm.identity,
        "editor": editor.describe(),
        "objective": editor.objective.config() if editor.objective else None,
        "dataset": source,
        **({"truncate": True} if truncate else {}),
        **({"probes": probes} if probes else {}),
        **({"evaluation": evaluator.describe()} if evaluator.describe() else {}),
        **({"ability": ability.describe()} if ability else {}),
        "limit": limit,
        "seed": seed,
        "threads": threads,
        "parallel": parallel,
        "eval_cache": eval_cache,
    }
