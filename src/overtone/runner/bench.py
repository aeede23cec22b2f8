"""Single editing over a benchmark: for each case, evaluate, edit, evaluate, revert, store.

Every edit starts from the unedited weights and is reverted after its evaluation (bit-exact), so the
cases are independent and a run can stop and resume anywhere.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import EditError, Editor
from overtone.evaluation.teacher_forced import METRICS, Evaluator
from overtone.runner.store import ResultStore

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A case failed; results of the cases before it are on disk and a restart resumes after them."""


def edit_and_score(editor: Editor, evaluator: Evaluator, case: EditCase) -> dict[str, Any]:
    """Result record of one independent edit: pre/post metrics, edit statistics and timings."""
    start = time.perf_counter()
    probes = evaluator.probes(case)
    pre = evaluator.predict(probes, record_from=editor.first_layer)
    eval_s = time.perf_counter() - start
    handle = editor.edit([case])
    try:
        start = time.perf_counter()
        replay = pre.cache if pre.cache is not None and handle.first_layer >= pre.cache.start else None
        post = evaluator.predict(probes, replay=replay)
        eval_s += time.perf_counter() - start
    finally:
        handle.revert()
    pre_scores = evaluator.score(probes, pre, reference=None)
    post_scores = evaluator.score(probes, post, reference=pre)
    stats = handle.stats
    return {
        "case_id": case.case_id,
        "pre": {m: v for m, v in pre_scores.as_dict().items() if m != "loc"},
        "post": post_scores.as_dict(),
        "detail": post_scores.detail,
        "steps": stats.steps,
        "stopped_early": stats.stopped_early,
        "final_loss": stats.losses[-1] if stats.losses else None,
        "losses": [round(x, 6) for x in stats.losses],
        "edit_s": round(stats.time_s, 4),
        "eval_s": round(eval_s, 4),
    }


def run_single_editing(
    editor: Editor,
    evaluator: Evaluator,
    cases: Sequence[EditCase],
    store: ResultStore,
    on_case: Callable[[dict[str, Any] | None], None] | None = None,
) -> dict[str, Any]:
    """Edit every case not yet in ``store``; returns the summary of all stored cases."""
    done = store.done
    for case in cases:
        if case.case_id in done:
            if on_case:
                on_case(None)
            continue
        try:
            record = edit_and_score(editor, evaluator, case)
        except (EditError, ValueError) as exc:
            raise RunError(
                f"case {case.case_id} failed: {exc}. The {len(store.records)} finished cases are saved in "
                f"{store.dir}; rerun the same command to resume after fixing the cause."
            ) from exc
        store.append(record)
        if on_case:
            on_case(record)
    wanted = {c.case_id for c in cases}
    summary = summarize([r for r in store.records if r["case_id"] in wanted])
    store.write_summary(summary)
    return summary


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over cases, x100 as in the paper's tables; Avg. is the mean of the four metrics.

    A metric is averaged over the cases that have probes for it (every ZsRE case has all four).
    """
    post = {m: _mean([r["post"].get(m) for r in records]) for m in METRICS}
    pre = {m: _mean([r["pre"].get(m) for r in records]) for m in ("rel", "gen", "por")}
    present = [v for v in post.values() if v is not None]
    summary: dict[str, Any] = {m: None if v is None else round(100 * v, 2) for m, v in post.items()}
    summary["avg"] = round(100 * sum(present) / len(present), 2) if present else None
    summary["pre"] = {m: None if v is None else round(100 * v, 2) for m, v in pre.items()}
    summary["n_cases"] = len(records)
    summary["mean_steps"] = _mean([r["steps"] for r in records])
    summary["mean_edit_s"] = _mean([r["edit_s"] for r in records])
    summary["mean_eval_s"] = _mean([r["eval_s"] for r in records])
    return summary
