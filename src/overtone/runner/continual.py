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
restart skips finished chunks and runs an interrupted chunk again from its start.

Single editing with ``parallel`` = B > 1 hands windows of ``PARALLEL_WINDOW`` x B pending cases to
``edit_cases``, which edits them B at a time (each against the unedited weights; cases of similar
length together) and returns their records in case order; a window's records are written together.
They are the records of B = 1 up to floating-point summation order, so a run may be resumed with
another B.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import Editor
from overtone.evaluation.teacher_forced import Evaluator
from overtone.runner.bench import CaseError, RunError, check_parallel_cases, edit_cases, edit_chunk, summarize
from overtone.runner.store import ResultStore

# Single editing with --parallel B: cases handed to the parallel edit at a time, in groups of B (more
# groups to choose from make groups of similar length; a restart redoes at most one window).
PARALLEL_WINDOW = 4


def chunked(cases: Sequence[EditCase], size: int) -> list[Sequence[EditCase]]:
    """Consecutive chunks of ``size`` cases; the last one may be shorter."""
    if size < 1:
        raise ValueError(f"the sequence length T must be >= 1, got {size}")
    return [cases[i: i + size] for i in range(0, len(cases), size)]


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
    parallel: int = 1,
) -> dict[str, Any]:
    """Edit every chunk of ``cases`` not yet in ``store`` (``batch`` cases per edit call); returns the summary
    of all stored cases. ``step_budgets`` gives each case an exact number of updates (matched steps);
    ``parallel`` > 1 edits that many single-editing cases at once."""
    if parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {parallel}")
    if parallel > 1:
        if sequence > 1 or batch > 1:
            raise ValueError(f"--parallel {parallel} edits independent cases (single editing); the cases of a "
                             f"--sequence {sequence} / --batch {batch} chunk build on each other: use --parallel 1")
        check_parallel_cases(cases)
    done = store.done
    group: list[tuple[int, Sequence[EditCase]]] = []  # chunks waiting to be edited together

    def run(group: list[tuple[int, Sequence[EditCase]]]) -> None:
        try:
            if parallel == 1:
                records = edit_chunk(editor, evaluator, group[0][1], eval_timing, batch, step_budgets)
            else:
                records = edit_cases(editor, evaluator, [c for _, chunk in group for c in chunk], parallel,
                                     step_budgets)
        except CaseError as exc:
            raise RunError(
                f"{exc}. The {len(store.records)} finished cases are saved in {store.dir}; rerun the same "
                "command to resume after fixing the cause."
            ) from exc
        if sequence > 1:
            for record in records:
                record["chunk"] = group[0][0]
        store.append_many(records)
        for record in records:
            if on_case:
                on_case(record)

    for index, chunk in enumerate(chunked(cases, sequence)):
        ids = [c.case_id for c in chunk]
        stored = sum(i in done for i in ids)
        if stored == len(chunk):
            for _ in chunk:
                if on_case:
                    on_case(None)
            continue
        if stored:
            raise RunError(
                f"chunk {index} ({ids[0]} .. {ids[-1]}) is partly in {store.dir} ({stored} of {len(chunk)} cases): "
                "an earlier run ended it elsewhere (a --limit that is not a multiple of --sequence) or was killed "
                "while writing it. Use another --out directory."
            )
        group.append((index, chunk))
        if len(group) == (1 if parallel == 1 else PARALLEL_WINDOW * parallel):
            run(group)
            group = []
    if group:
        run(group)
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
