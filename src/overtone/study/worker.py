"""What a study's worker does: edit and score the cases of a task, with one model kept loaded.

A ``Task`` is a shard of one cell: consecutive chunks of its cases (single editing: chunks of one
case, so a shard is a few cases; continual editing: whole chunks of T cases, never split). The
worker yields one ``Delivery`` per chunk, so the driver stores each finished chunk at once; it never
writes a file itself. The same class runs in the driver's process (the local executor) and inside a
Ray actor (one per worker process), where it keeps its model between tasks.

A chunk's results do not depend on which worker ran it or on what it ran before: every editor
derives its random numbers from its ``seed`` setting and the case ids, the global generators are
seeded from the cell's seed before each chunk, and the weights are reverted bit-exactly after it.
A single-editing cell with ``parallel`` B > 1 edits the cases of a shard B at a time
(``runner.bench.edit_cases``, the records of one at a time up to float rounding) and delivers the
shard's records together.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from overtone.study.spec import Cell, ModelSpec

log = logging.getLogger(__name__)

PARALLEL_AUTO_MOST = 16  # --parallel auto in a study: at most this many cases at once (a shard holds 4 groups)


@dataclass(frozen=True)
class Task:
    """A shard of a cell: chunks (index, case ids) in order, and step budgets for a matched-steps cell."""

    cell: Cell
    chunks: tuple[tuple[int, tuple[str, ...]], ...]
    budgets: tuple[tuple[str, int], ...] = ()

    @property
    def case_ids(self) -> list[str]:
        return [case_id for _, ids in self.chunks for case_id in ids]

    def __str__(self) -> str:
        ids = self.case_ids
        return f"{self.cell.name} [{ids[0]} .. {ids[-1]}, {len(ids)} cases]"


@dataclass
class Delivery:
    """The records of one finished chunk and the run configuration of its cell (for ``config.yaml``)."""

    cell_id: str
    config: dict[str, Any]
    records: list[dict[str, Any]]


class TaskError(RuntimeError):
    """A task failed for a reason that running it elsewhere will not fix (a bad setting, a failing case)."""


@dataclass
class _Prepared:
    editor: Any
    evaluator: Any
    cases: dict[str, Any]
    config: dict[str, Any]
    ability: Any  # evaluation.ability.AbilityMonitor, or None
    parallel: int


class Worker:
    """Runs tasks; keeps one model and the editor of the last cell it ran."""

    def __init__(self, threads: int = 1) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per worker and model says nothing
        torch.set_num_threads(threads)
        self.threads = threads
        self.model: ModelSpec | None = None
        self._lm: Any = None
        self._cell_id: str | None = None
        self._prepared: _Prepared | None = None

    def identity(self) -> dict[str, Any]:
        """Where this worker runs and which code it runs (the driver checks the versions agree)."""
        from overtone.version import __version__

        return {"pid": os.getpid(), "host": socket.gethostname(), "version": __version__}

    def _load(self, spec: ModelSpec) -> Any:
        if self.model != spec:
            import torch

            from overtone.models import ArchitectureError, ModelLoadError, load_model

            self._lm = self._prepared = self._cell_id = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the previous model's memory, before the next one is loaded
            try:
                self._lm = load_model(spec.name, device=spec.device, dtype=spec.dtype)
            except (ModelLoadError, ArchitectureError, FileNotFoundError) as exc:
                raise TaskError(str(exc)) from exc
            self.model = spec
        return self._lm

    def _prepare(self, cell: Cell) -> _Prepared:
        if self._cell_id == cell.id and self._prepared is not None:
            return self._prepared
        from overtone.benchmarks import DatasetError, load_benchmark, resolve_dataset
        from overtone.corpus import CorpusError
        from overtone.editors import make_editor
        from overtone.editors.parallel import parallel_size
        from overtone.evaluation import GenerationSettings, WildSettings, make_evaluator
        from overtone.evaluation.ability import AbilityMonitor, AbilitySettings
        from overtone.models import ArchitectureError
        from overtone.objectives import make_objective
        from overtone.runner.checks import prepare_cases
        from overtone.runner.config import run_config

        lm = self._load(cell.model)
        self._prepared = None
        try:
            editor = make_editor(cell.editor, lm, make_objective(cell.variant.objective, cell.variant.overtone),
                                 **cell.editor_settings)
            bench = resolve_dataset(cell.dataset)
            evaluator = make_evaluator(bench.evaluation, lm,
                                       GenerationSettings(seed=cell.seed, **dict(cell.generation)),
                                       cell.evaluation, WildSettings(context=cell.eval_context))
            cases = prepare_cases(load_benchmark(cell.dataset, limit=cell.limit, offset=cell.offset),
                                  lm.tokenizer, type(editor), editor.config)
            ability = AbilityMonitor(lm, AbilitySettings(every=cell.ability_every)) if cell.ability else None
        except (ArchitectureError, CorpusError, DatasetError, ValueError, FileNotFoundError) as exc:
            raise TaskError(f"{cell.name}: {exc}") from exc
        parallel = cell.parallel
        if parallel == "auto":
            parallel = parallel_size(editor.case_memory(), lm.device, PARALLEL_AUTO_MOST)
        config = run_config(lm, editor, evaluator, bench, cell.dataset, cell.offset, cell.limit, cell.seed,
                            self.threads, cell.sequence, cell.eval_timing, cell.batch, cell.variant.match_steps,
                            ability=ability, parallel=int(parallel))
        self._prepared = _Prepared(editor, evaluator, {c.case_id: c for c in cases}, config, ability, int(parallel))
        self._cell_id = cell.id
        return self._prepared

    def run(self, task: Task) -> Iterator[Delivery]:
        """Edit and score the task's chunks in order, yielding each chunk's records as soon as it is done."""
        import torch

        from overtone.runner.bench import CaseError, edit_cases
        from overtone.runner.continual import chunk_records

        cell = task.cell
        prepared = self._prepare(cell)
        budgets = dict(task.budgets) if task.budgets else None
        missing = [i for i in task.case_ids if i not in prepared.cases]
        if missing:
            raise TaskError(f"{cell.name}: the dataset has no case(s) {', '.join(missing)}")
        torch.manual_seed(cell.seed)
        random.seed(cell.seed)
        if prepared.parallel > 1:  # single editing: the shard's cases side by side, delivered together
            try:
                records = edit_cases(prepared.editor, prepared.evaluator, [prepared.cases[i] for i in task.case_ids],
                                     prepared.parallel, budgets, prepared.ability)
            except (CaseError, ValueError) as exc:
                raise TaskError(f"{cell.name}: {exc}") from exc
            yield Delivery(cell.id, prepared.config, records)
            return
        for index, ids in task.chunks:
            torch.manual_seed(cell.seed)
            random.seed(cell.seed)
            try:
                records = chunk_records(prepared.editor, prepared.evaluator, index,
                                        [prepared.cases[i] for i in ids], cell.sequence, cell.eval_timing,
                                        cell.batch, budgets, prepared.ability)
            except (CaseError, ValueError) as exc:
                raise TaskError(f"{cell.name}: {exc}") from exc
            yield Delivery(cell.id, prepared.config, records)
