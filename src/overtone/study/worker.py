"""What a study's worker does: edit and score the cases of a task, with one model kept loaded.

A ``Task`` is a shard of one cell: consecutive chunks of its cases (single editing: chunks of one
case, so a shard is a few cases; continual editing: whole chunks of T cases, never split). The
worker yields one ``Delivery`` per chunk, so the driver stores each finished chunk at once; it never
writes a file itself. The same class runs in the driver's process (the local executor) and inside a
Ray actor (one per worker process), where it keeps its model between tasks.

A cell is run by the runner like ``overtone bench``'s run: ``Cell.run_spec`` is its ``RunSpec`` and
``runner.run.prepare_run`` builds the editor, evaluator and configuration on the worker's model. A
chunk's results do not depend on which worker ran it or on what it ran before: every editor derives
its random numbers from its ``seed`` setting and the case ids, the global generators are seeded from
the cell's seed before each chunk (``runner.continual.reseed``, the rule of every run), and the
weights are reverted bit-exactly after it. A single-editing cell with ``parallel`` B > 1 edits the
cases of a shard B at a time (``PreparedRun.window``, the records of one at a time up to float
rounding) and delivers the shard's records together.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from overtone.study.spec import Cell, ModelSpec

log = logging.getLogger(__name__)


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
        self._prepared: Any = None  # runner.run.PreparedRun of the last cell
        self._by_id: dict[str, Any] = {}  # its cases by id

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

    def _prepare(self, cell: Cell) -> Any:
        """The cell's run, prepared by the runner (runner/run.py) on the loaded model; kept for its next task."""
        if self._cell_id == cell.id and self._prepared is not None:
            return self._prepared
        from overtone.runner.run import prepare_run
        from overtone.runner.spec import SpecError

        lm = self._load(cell.model)
        self._prepared = None
        try:
            self._prepared = prepare_run(cell.run_spec(self.threads), lm=lm)
        except SpecError as exc:
            raise TaskError(f"{cell.name}: {exc}") from exc
        self._by_id = {c.case_id: c for c in self._prepared.cases}
        self._cell_id = cell.id
        return self._prepared

    def run(self, task: Task) -> Iterator[Delivery]:
        """Edit and score the task's chunks in order, yielding each chunk's records as soon as it is done."""
        from overtone.runner.bench import CaseError

        cell = task.cell
        prepared = self._prepare(cell)
        budgets = dict(task.budgets) if task.budgets else None
        missing = [i for i in task.case_ids if i not in self._by_id]
        if missing:
            raise TaskError(f"{cell.name}: the dataset has no case(s) {', '.join(missing)}")
        try:
            if prepared.parallel > 1:  # single editing: the shard's cases side by side, delivered together
                yield Delivery(cell.id, prepared.config,
                               prepared.window([self._by_id[i] for i in task.case_ids], budgets))
                return
            for index, ids in task.chunks:
                yield Delivery(cell.id, prepared.config, prepared.chunk(index, [self._by_id[i] for i in ids], budgets))
        except (CaseError, ValueError) as exc:
            raise TaskError(f"{cell.name}: {exc}") from exc
