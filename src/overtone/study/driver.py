"""The driver of a study: plans the work, hands it to an executor, and is the only writer of results.

Nothing lost, nothing twice:

* Every cell is a run directory (``config.yaml``, ``cases.jsonl``, ``summary.json``, runner/store.py).
  Only the driver writes them: workers return records (one ``Delivery`` per finished chunk), the
  driver appends those of cases not yet stored and syncs them to disk at once. Two workers can never
  write the same file, and a record that arrives twice (a shard rerun after its worker died) is dropped.
* A restart reads what is stored and plans only the rest; a chunk is stored whole or rerun whole.
* A worker that dies mid-shard (``Scheduler.task_lost``) has the unfinished chunks of its shard queued
  again, for any worker; a shard that kills ``MAX_LOSSES`` workers fails its cell instead of looping.
* One driver per study directory: ``study.lock`` (an ``flock`` the kernel releases if the driver dies).

A cell whose ``after`` names another (the matched-steps CE control) waits until that cell is done; it
then runs on the cases that cell stored, each for the number of updates it took there, if that cell
stopped early on some case, and is marked not needed otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import yaml
from filelock import FileLock, Timeout

from overtone.runner.bench import divergence, summarize
from overtone.runner.continual import PARALLEL_WINDOW
from overtone.runner.store import CONFIG_FILE, ResultStore, StoreError, read_run
from overtone.runner.variants import step_budgets, stopped_early
from overtone.study.spec import Cell, ModelSpec, Study, StudyError
from overtone.study.worker import Delivery, Task

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
SPEC_FILE = "study.yaml"
STATE_FILE = "state.json"
LOCK_FILE = "study.lock"
MAX_LOSSES = 3  # workers a shard may take down before its cell is failed
DEFAULT_SHARD = 4  # cases per task in single editing: small, so a lost worker costs little
AUTO_SHARD = 64  # cases per task of a cell with parallel auto: room for groups of similar length


class Executor(Protocol):
    """Runs a scheduler's tasks on workers until none is left (study/executors.py)."""

    def run(self, scheduler: Scheduler) -> None: ...


# States of a cell.
WAITING, READY, DONE, FAILED, SKIPPED = "waiting", "ready", "done", "failed", "not needed"


@dataclass
class CellState:
    cell: Cell
    dir: Path
    ids: list[str]  # the cell's cases, in order (a matched cell: set once its source is done)
    records: dict[str, dict[str, Any]]  # stored records by case id
    status: str = READY
    message: str = ""
    store: ResultStore | None = None
    queue: deque[Task] = field(default_factory=deque)
    running: int = 0
    losses: dict[tuple[str, ...], int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return bool(self.ids) and all(i in self.records for i in self.ids)


def _atomic_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str))
    tmp.replace(path)


def read_records(directory: Path) -> dict[str, dict[str, Any]]:
    """Stored records of a cell by case id ({} when it never started)."""
    if not (directory / CONFIG_FILE).exists():
        return {}
    return {r["case_id"]: r for r in read_run(directory)[1]}


class Scheduler:
    """The work of a study and its progress; executors pull tasks from it and hand results back.

    Not thread-safe: an executor calls it from one thread (the driver's).
    """

    def __init__(self, study: Study, out: Path, shard_size: int = DEFAULT_SHARD,
                 on_progress: Callable[[Scheduler, CellState], None] | None = None) -> None:
        if shard_size < 1:
            raise StudyError(f"the shard size must be >= 1, got {shard_size}")
        self.study, self.out, self.shard_size = study, out, shard_size
        self.on_progress = on_progress
        self.cells: dict[str, CellState] = {}
        self._cases: dict[tuple[str, int, int | None], list[str]] = {}
        for cell in study.cells:
            state = CellState(cell, out / cell.name, [], read_records(out / cell.name))
            self.cells[cell.id] = state
            if cell.after is None:
                state.ids = self.case_ids(cell)
                self._start(state)
            else:
                state.status = WAITING
        for state in self.cells.values():
            if state.status == WAITING:
                self._release(state)

    # ---- planning

    def case_ids(self, cell: Cell) -> list[str]:
        from overtone.benchmarks import DatasetError, load_benchmark

        key = (cell.dataset, cell.offset, cell.limit)
        if key not in self._cases:
            try:
                self._cases[key] = [c.case_id for c in load_benchmark(cell.dataset, limit=cell.limit,
                                                                        offset=cell.offset)]
            except (DatasetError, ValueError) as exc:
                raise StudyError(f"{cell.name}: {exc}") from exc
        return self._cases[key]

    def _chunks(self, state: CellState) -> list[tuple[int, tuple[str, ...]]]:
        size = state.cell.sequence
        return [(i // size, tuple(state.ids[i: i + size])) for i in range(0, len(state.ids), size)]

    def _start(self, state: CellState, budgets: dict[str, int] | None = None) -> None:
        """Queue the chunks of a cell that are not stored yet, in shards."""
        if not state.ids:
            self._fail(state, "offset and limit select no case of the dataset")
            return
        pending = [c for c in self._chunks(state) if not all(i in state.records for i in c[1])]
        if not pending:
            self._finish(state)
            return
        per_task = max(1, self.shard_size // state.cell.sequence)
        if isinstance(state.cell.parallel, int) and state.cell.parallel > 1:  # room for groups of similar length
            per_task = max(per_task, PARALLEL_WINDOW * state.cell.parallel)
        elif state.cell.parallel == "auto":
            per_task = max(per_task, AUTO_SHARD)
        for first in range(0, len(pending), per_task):
            chunks = tuple(pending[first: first + per_task])
            ids = [i for _, chunk in chunks for i in chunk]
            shard_budgets = tuple((i, budgets[i]) for i in ids) if budgets is not None else ()
            state.queue.append(Task(state.cell, chunks, shard_budgets))
        state.status = READY

    def _release(self, state: CellState) -> None:
        """Start a waiting cell whose source is done; skip it when its source failed or needs no control."""
        source = self.cells.get(state.cell.after or "")
        if source is None or source.status in (FAILED, SKIPPED):
            state.status, state.message = SKIPPED, f"its source row {state.cell.variant.match_steps} did not finish"
        elif source.status == DONE:
            records = [source.records[i] for i in source.ids]
            if not stopped_early(records):
                state.status = SKIPPED
                state.message = f"{source.cell.variant.label} never stopped early: nothing to match"
            else:
                budgets = step_budgets(records)
                state.ids = [i for i in source.ids if i in budgets]
                self._start(state, budgets)
                return
        else:
            return
        self._write_state()
        self._release_dependents(state)

    def _release_dependents(self, source: CellState) -> None:
        for state in self.cells.values():
            if state.status == WAITING and state.cell.after == source.cell.id:
                self._release(state)

    # ---- what executors call

    def next_task(self, model: ModelSpec | None = None, cell_id: str | None = None) -> Task | None:
        """The next shard, preferring the cell (then the model) the asking worker has loaded; None if none is
        ready now (more may become ready when running tasks finish)."""
        ready = [s for s in self.cells.values() if s.queue and s.status == READY]
        if not ready:
            return None
        preferred = next((s for s in ready if s.cell.id == cell_id), None) or next(
            (s for s in ready if s.cell.model == model), None) or ready[0]
        preferred.running += 1
        return preferred.queue.popleft()

    @property
    def finished(self) -> bool:
        """No task queued or running, and no cell that could still become ready."""
        return not any(s.queue or s.running for s in self.cells.values() if s.status != FAILED)

    def deliver(self, delivery: Delivery) -> None:
        """Store a finished chunk: only records of cases not stored yet, in one synced write."""
        state = self.cells[delivery.cell_id]
        if state.status == FAILED:
            return
        try:
            if state.store is None:
                state.store = ResultStore(state.dir, delivery.config)
            new = [r for r in delivery.records if r["case_id"] not in state.records and r["case_id"] in state.ids]
            if new:
                state.store.append_many(new)
        except (StoreError, OSError) as exc:
            self._fail(state, str(exc))
            return
        state.records.update((r["case_id"], r) for r in new)
        for record in new:
            why = divergence(record) if record.get("diverged") else None
            if why:
                log.warning("%s: case %s: the edit diverged (%s)", state.cell.name, record["case_id"], why)
        if len(new) < len(delivery.records):
            log.info("%s: %d record(s) already stored, not written again", state.cell.name,
                     len(delivery.records) - len(new))
        if self.on_progress:
            self.on_progress(self, state)

    def task_done(self, task: Task) -> None:
        """A worker finished ``task`` and delivered every chunk of it."""
        state = self.cells[task.cell.id]
        state.running -= 1
        left = self._undelivered(state, task)
        if left:  # a worker that ended without delivering everything: never lose those cases silently
            state.queue.appendleft(Task(task.cell, left, task.budgets))
        self._maybe_finish(state)

    def task_lost(self, task: Task, reason: str) -> None:
        """The worker running ``task`` died: queue the chunks it did not deliver again, for any worker."""
        state = self.cells[task.cell.id]
        state.running -= 1
        left = self._undelivered(state, task)
        if left:
            key = tuple(i for _, chunk in left for i in chunk)
            state.losses[key] = state.losses.get(key, 0) + 1
            if state.losses[key] >= MAX_LOSSES:
                self._fail(state, f"cases {key[0]} .. {key[-1]} took down {MAX_LOSSES} workers ({reason}); "
                                  "out of memory? Rerun the study to try again")
                return
            log.warning("%s: its worker died (%s); %d case(s) queued again", task, reason, len(key))
            state.queue.appendleft(Task(task.cell, left, task.budgets))
        else:
            log.warning("%s: its worker died (%s) after delivering every chunk; nothing to run again", task, reason)
        self._maybe_finish(state)

    def _undelivered(self, state: CellState, task: Task) -> tuple[tuple[int, tuple[str, ...]], ...]:
        if state.status == FAILED:
            return ()
        return tuple(c for c in task.chunks if not all(i in state.records for i in c[1]))

    def _maybe_finish(self, state: CellState) -> None:
        if state.status == READY and state.complete and not state.running and not state.queue:
            self._finish(state)

    def task_failed(self, task: Task, message: str) -> None:
        state = self.cells[task.cell.id]
        state.running -= 1
        self._fail(state, message)

    # ---- cell ends

    def _finish(self, state: CellState) -> None:
        records = [state.records[i] for i in state.ids]
        if state.store is None:  # done in an earlier run
            config = yaml.safe_load((state.dir / CONFIG_FILE).read_text())
            state.store = ResultStore(state.dir, config)
        state.store.write_summary(summarize(records))
        state.store.close()  # and its directory's lock
        state.store = None
        state.status = DONE
        log.info("%s: done (%d cases)", state.cell.name, len(records))
        self._write_state()
        self._release_dependents(state)

    def _fail(self, state: CellState, message: str) -> None:
        if state.status == FAILED:
            return
        state.status, state.message = FAILED, message
        state.queue.clear()
        log.error("%s failed: %s", state.cell.name, message)
        self._write_state()
        self._release_dependents(state)

    def _write_state(self) -> None:
        """``state.json``: cells that failed or are not needed, and why (``overtone study status`` reads it)."""
        ended = {s.cell.id: {"status": s.status, "message": s.message} for s in self.cells.values()
                 if s.status in (FAILED, SKIPPED)}
        _atomic_json(self.out / STATE_FILE, {"updated": datetime.now().isoformat(timespec="seconds"),
                                             "cells": ended})

    def close(self) -> None:
        """Release the cells' run directories (each store holds its directory's lock)."""
        for state in self.cells.values():
            if state.store is not None:
                state.store.close()
                state.store = None

    def progress(self) -> tuple[int, int]:
        """(cases stored, cases planned) over the cells that are to run (a waiting cell counts once released)."""
        live = [s for s in self.cells.values() if s.status not in (FAILED, SKIPPED)]
        return (sum(sum(i in s.records for i in s.ids) for s in live), sum(len(s.ids) for s in live))

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.cells.values():
            counts[s.status] = counts.get(s.status, 0) + 1
        return counts


def write_plan(study: Study, out: Path, cases: Callable[[Cell], list[str]] | None = None) -> None:
    """``study.yaml`` (the resolved spec) and ``plan.json`` (the cells) next to the cells' directories."""
    out.mkdir(parents=True, exist_ok=True)
    (out / SPEC_FILE).write_text(yaml.safe_dump(study.spec, sort_keys=False, allow_unicode=True))
    cells = [{**c.describe(), **({"cases": len(cases(c))} if cases else {})} for c in study.cells]
    _atomic_json(out / PLAN_FILE, {"name": study.name, "description": study.description, "notes": study.notes,
                                   "cells": cells})


def read_plan(out: Path) -> dict[str, Any]:
    path = out / PLAN_FILE
    if not path.exists():
        raise StudyError(f"{out} is not a study directory (no {PLAN_FILE}); run `overtone study run FILE --out {out}`")
    return json.loads(path.read_text())


def cell_states(out: Path) -> list[dict[str, Any]]:
    """Each planned cell of a study directory with its stored case count and state (for status and tables)."""
    plan = read_plan(out)
    ended = {}
    if (out / STATE_FILE).exists():
        ended = json.loads((out / STATE_FILE).read_text()).get("cells", {})
    rows = []
    for cell in plan["cells"]:
        done = len(read_records(out / cell["dir"]))
        total = cell.get("cases")
        if cell["id"] in ended:
            status = ended[cell["id"]]["status"]
        elif (out / cell["dir"] / "summary.json").exists() and (total is None or done >= total):
            status = DONE
        elif cell.get("after") and not done:
            status = WAITING
        else:
            status = "partial" if done else "pending"
        rows.append({**cell, "done": done, "status": status, "message": ended.get(cell["id"], {}).get("message", "")})
    return rows


def driver_running(out: Path) -> str | None:
    """Who holds the study's lock (a running driver), or None."""
    lock = FileLock(str(out / LOCK_FILE), blocking=False)
    try:
        lock.acquire()
    except Timeout:
        holder = out / (LOCK_FILE + ".holder")
        return holder.read_text() if holder.exists() else "another process"
    lock.release()
    return None


def run_study(study: Study, out: Path, executor: Executor, shard_size: int = DEFAULT_SHARD,
              on_progress: Callable[[Scheduler, CellState], None] | None = None) -> Scheduler:
    """Run every cell of ``study`` that is not finished into ``out``; returns the scheduler with the outcome."""
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK_FILE), blocking=False)
    try:
        lock.acquire()
    except Timeout:
        holder = out / (LOCK_FILE + ".holder")
        who = holder.read_text() if holder.exists() else "another process"
        raise StudyError(f"{out} is being run by another driver ({who}); wait for it or use another --out") from None
    try:
        (out / (LOCK_FILE + ".holder")).write_text(f"pid {os.getpid()} on {socket.gethostname()}")
        scheduler = Scheduler(study, out, shard_size, on_progress)
        try:
            write_plan(study, out, scheduler.case_ids)
            if not scheduler.finished:
                executor.run(scheduler)
        finally:
            scheduler.close()
    finally:
        lock.release()
    return scheduler
