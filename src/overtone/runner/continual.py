"""Runs over a benchmark: chunks of T cases edited in sequence, the model reverted between chunks.

This is continual editing as in WISE and the paper's App. C (docs/protocol.md (h)): the selected
cases are split into consecutive chunks of ``sequence`` = T; in each chunk the T edits are applied in
order without reverting, every case of the chunk is evaluated on the final model (or right after its
own edit, ``eval_timing="after-each"``), then the chunk is reverted bit-exactly, so the next chunk
starts from the unedited model. Metrics are averaged over the cases of a chunk, then over chunks.
T = 1 is single editing. With a batch size B (<= T), the T edits of a chunk are T/B edit calls of B
cases each (batch editing; B = T is one joint edit of the chunk, MEMIT's mass editing).

The model is loaded once; edits and reverts happen in place. The revert handles of a chunk hold one
copy of each edited tensor, not one per edit (``EditStack``), and are dropped after the revert, so
memory stays flat over any number of chunks. During a chunk, the unedited activations of its cases
are kept for the cheaper edited pass (a few MB per case for a 7B model).

A chunk's records are written together once it is done. The model inside a chunk is not saved, so a
restart skips finished chunks and runs an interrupted chunk again from its start. Records of a chunk
carry its index and size (``chunk``, ``chunk_size``): a chunk that a kill left partly written (its
first records on disk, the rest cut off) is edited again and only its missing records are added.

Before the first edit, every case is checked against the editor and the evaluation
(``runner.checks``). A diverged edit (``bench.divergence``) is recorded with a warning naming the
case and the likely setting; with ``strict`` it stops the run instead.

In single editing every case starts from the unedited model, so the unedited-model evaluation
(``Evaluator.before_many``) of the next ``PREFETCH`` cases is done together: an evaluator that batches
across cases (the wild one generates the probes' answers) then does so in single editing too, as it
does within a chunk of continual editing. Memory then holds those cases' pending evaluations.

Single editing with ``parallel`` = B > 1 hands windows of ``PARALLEL_WINDOW`` x B pending cases to
``edit_cases``, which edits them B at a time (each against the unedited weights; cases of similar
length together) and returns their records in case order; a window's records are written together.
They are the records of B = 1 up to floating-point summation order, so a run may be resumed with
another B.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import Editor
from overtone.evaluation.ability import AbilityMonitor
from overtone.evaluation.teacher_forced import Evaluator
from overtone.runner.bench import (
    CaseError,
    EditObserver,
    RunError,
    divergence,
    edit_cases,
    edit_chunk,
    likely_cause,
    reseed,
    summarize,
)
from overtone.runner.checks import prepare_cases
from overtone.runner.store import ResultStore
from overtone.runner.stream import STREAM_DIR, StreamSettings, stream_records

log = logging.getLogger(__name__)

PREFETCH = 16  # cases evaluated on the unedited model together, ahead of their chunks
# Single editing with --parallel B: cases handed to the parallel edit at a time, in groups of B (more
# groups to choose from make groups of similar length; a restart redoes at most one window).
PARALLEL_WINDOW = 4


def chunked(cases: Sequence[EditCase], size: int) -> list[Sequence[EditCase]]:
    """Consecutive chunks of ``size`` cases; the last one may be shorter."""
    if size < 1:
        raise ValueError(f"the sequence length T must be >= 1, got {size}")
    return [cases[i: i + size] for i in range(0, len(cases), size)]



def mark_chunk(records: list[dict[str, Any]], index: int, size: int) -> None:
    """Name the continual-editing chunk (index, size) in its records, so a restart can tell it apart."""
    for record in records:
        record.update(chunk=index, chunk_size=size)


def chunk_records(
    editor: Editor, evaluator: Evaluator, index: int, chunk: Sequence[EditCase], sequence: int = 1,
    eval_timing: str = "end", batch: int = 1, step_budgets: Mapping[str, int] | None = None,
    ability: AbilityMonitor | None = None, seed: int | None = None, stream: StreamSettings | None = None,
) -> list[dict[str, Any]]:
    """The records of chunk number ``index`` of a run, as ``run_continual`` stores them (the global generators
    seeded from ``seed`` first); a study's workers (study/worker.py) edit their shards' chunks with it. With
    ``stream`` the chunk is an edit stream without checkpoints (runner/stream.py)."""
    reseed(seed)
    if stream is not None:
        records = stream_records(editor, evaluator, chunk, batch, stream, seed, ability)
    else:
        records = edit_chunk(editor, evaluator, chunk, eval_timing, batch, step_budgets, ability=ability)
    if sequence > 1:
        mark_chunk(records, index, len(chunk))
    return records


def run_continual(
    editor: Editor,
    evaluator: Evaluator,
    cases: Sequence[EditCase],
    store: ResultStore,
    sequence: int = 1,
    eval_timing: str = "end",
    on_case: Callable[[dict[str, Any] | None], None] | None = None,
    batch: int = 1,
    step_budgets: Mapping[str, int] | None = None,
    strict: bool = False,
    ability: AbilityMonitor | None = None,
    parallel: int = 1,
    seed: int | None = None,
    observer: EditObserver | None = None,
    stream: StreamSettings | None = None,
) -> dict[str, Any]:
    """Edit every chunk of ``cases`` not yet in ``store`` (``batch`` cases per edit call, the general ability
    measured at each chunk's end with ``ability``); returns the summary of all stored cases. ``step_budgets``
    gives each case an exact number of updates (matched steps); ``strict``: a diverged edit is an error
    (default: flagged with a warning); ``parallel`` > 1 edits that many single-editing cases at once (the
    runner's ``RunSpec`` checks the protocol allows it); ``seed`` reseeds the global generators before each
    chunk and window (``reseed``); ``observer`` sees every edit call (``bench.EditObserver``). With ``stream``
    each chunk is an edit stream (runner/stream.py), checkpointed under the run directory's ``stream/``,
    and ``on_case`` is told of each edit as it is made instead of each record."""
    try:
        prepare_cases(cases, editor.lm.tokenizer, type(editor), editor.config)
    except ValueError as exc:
        raise RunError(str(exc)) from exc
    by_id = {r["case_id"]: r for r in store.records}
    chunks = chunked(cases, sequence)
    untouched = [not any(c.case_id in by_id for c in chunk) for chunk in chunks]  # no record of the chunk yet
    prefetched: dict[str, Any] = {}
    waiting: list[EditCase] = []  # --parallel: pending cases, edited together once a window is full

    def failed(exc: CaseError) -> RunError:
        return RunError(f"{exc}. The {len(store.records)} finished cases are saved in {store.dir}; once the cause is "
                        "fixed, the same command resumes (also with another --parallel or --threads); other "
                        "settings need another --out directory.")

    def announce(edits: int) -> None:
        for _ in range(edits):
            if on_case:
                on_case(None)

    def store_records(records: list[dict[str, Any]], chunk: tuple[int, int] | None) -> None:
        """Warn about (or, with ``strict``, stop at) diverged edits, then write the records not yet stored.
        ``chunk``: (index, size) of the continual-editing chunk the records belong to."""
        if chunk is not None:
            mark_chunk(records, *chunk)
        for record in records:
            why = divergence(record) if record["diverged"] else None
            if why:
                message = f"case {record['case_id']}: the edit diverged ({why}); likely cause: {likely_cause(editor)}"
                if strict:
                    raise RunError(f"{message}. --strict stops the run here; the {len(store.records)} finished "
                                   f"cases are saved in {store.dir}")
                log.warning(message)
        new = [r for r in records if r["case_id"] not in by_id]
        store.append_many(new)
        by_id.update((r["case_id"], r) for r in new)
        for record in records:
            if on_case and stream is None:  # a stream announced its edits as it made them
                on_case(record)

    def edit_window() -> None:
        reseed(seed)
        try:
            records = edit_cases(editor, evaluator, waiting, parallel, step_budgets, ability, observer)
        except CaseError as exc:
            raise failed(exc) from exc
        waiting.clear()
        store_records(records, None)

    for index, chunk in enumerate(chunks):
        ids = [c.case_id for c in chunk]
        stored = [by_id[i] for i in ids if i in by_id]
        if len(stored) == len(chunk):
            for _ in chunk:
                if on_case:
                    on_case(None)
            continue
        if stored and not all(r.get("chunk") == index and r.get("chunk_size") == len(chunk) for r in stored):
            raise RunError(
                f"chunk {index} ({ids[0]} .. {ids[-1]}) is partly in {store.dir} ({len(stored)} of {len(chunk)} "
                "cases) from a run whose chunks were cut differently (a --limit that is not a multiple of "
                "--sequence). Use another --out directory."
            )
        if stored:
            log.warning("chunk %d (%s .. %s): a killed run wrote %d of its %d records; editing the chunk again and "
                        "adding the missing ones", index, ids[0], ids[-1], len(stored), len(chunk))
        if stream is not None:
            try:
                records = stream_records(editor, evaluator, chunk, batch, stream, seed, ability,
                                         store.dir / STREAM_DIR / f"chunk-{index}", announce, observer)
            except CaseError as exc:
                raise failed(exc) from exc
            store_records(records, (index, len(chunk)))
            continue
        if parallel > 1:
            waiting += chunk
            if len(waiting) >= PARALLEL_WINDOW * parallel:
                edit_window()
            continue
        try:
            if ids[0] not in prefetched:
                window = list(chunk)  # single editing: and the next untouched cases, up to PREFETCH
                for later, fresh in zip(chunks[index + 1:], untouched[index + 1:], strict=True):
                    if sequence > 1 or len(window) >= PREFETCH or not fresh:
                        break
                    window += later
                try:
                    prefetched.update(zip((c.case_id for c in window),
                                          evaluator.before_many(window, record_from=editor.first_layer), strict=True))
                except ValueError as exc:
                    raise CaseError(", ".join(c.case_id for c in window), exc) from exc
            # handed over without a name here, so edit_chunk can free each case's pending state once used
            reseed(seed)
            records = edit_chunk(editor, evaluator, chunk, eval_timing, batch, step_budgets, ability=ability,
                                 pending=[prefetched.pop(i) for i in ids], observer=observer)
        except CaseError as exc:
            raise failed(exc) from exc
        store_records(records, (index, len(chunk)) if sequence > 1 else None)
    if waiting:
        edit_window()
    wanted = {c.case_id for c in cases}
    summary = summarize([r for r in store.records if r["case_id"] in wanted], evaluator.metrics)
    store.write_summary(summary)
    return summary


def run_single_editing(
    editor: Editor,
    evaluator: Evaluator,
    cases: Sequence[EditCase],
    store: ResultStore,
    on_case: Callable[[dict[str, Any] | None], None] | None = None,
) -> dict[str, Any]:
    """Single editing: every case edited from the unedited model, evaluated and reverted (T = 1)."""
    return run_continual(editor, evaluator, cases, store, sequence=1, on_case=on_case)
