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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import Editor
from overtone.evaluation.teacher_forced import Evaluator
from overtone.runner.bench import CaseError, RunError, edit_chunk, summarize
from overtone.runner.store import ResultStore


def chunked(cases: Sequence[EditCase], size: int) -> list[Sequence[EditCase]]:
    """Consecutive chunks of ``size`` cases; the last one may be shorter."""
    if size < 1:
        raise ValueError(f"the sequence length T must be >= 1, got {size}")
    return [cases[i: i + size] for i in range(0, len(cases), size)]


def chunk_records(
    editor: Editor, evaluator: Evaluator, index: int, chunk: Sequence[EditCase], sequence: int = 1,
    eval_timing: str = "end", batch: int = 1, step_budgets: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """The records of chunk number ``index`` of a run, as they are stored (continual records name their chunk).

    What every runner does with a chunk: ``run_continual`` here, and a study's workers (study/worker.py).
    """
    records = edit_chunk(editor, evaluator, chunk, eval_timing, batch, step_budgets)
    if sequence > 1:
        for record in records:
            record["chunk"] = index
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
) -> dict[str, Any]:
    """Edit every chunk of ``cases`` not yet in ``store`` (``batch`` cases per edit call); returns the summary
    of all stored cases. ``step_budgets`` gives each case an exact number of updates (matched steps)."""
    done = store.done
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
        try:
            records = chunk_records(editor, evaluator, index, chunk, sequence, eval_timing, batch, step_budgets)
        except CaseError as exc:
            raise RunError(
                f"{exc}. The {len(store.records)} finished cases are saved in {store.dir}; rerun the same "
                "command to resume after fixing the cause."
            ) from exc
        store.append_many(records)
        for record in records:
            if on_case:
                on_case(record)
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
