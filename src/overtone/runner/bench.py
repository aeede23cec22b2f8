"""Editing and scoring cases: one case from the unedited model, or a chunk of cases edited in sequence.

``edit_chunk`` is the protocol step every run is made of (runner/continual.py strings chunks together):

1. evaluate every case of the chunk on the unedited model: the pre metrics and the locality reference;
2. apply the cases' edits in order, never reverting in between;
3. evaluate the cases: all on the final model (``eval_timing="end"``, the protocol of WISE and the
   paper's App. C) or each right after its own edits (``"after-each"``);
4. revert every edit of the chunk, newest first (bit-exact).

A chunk of one case is single editing: every edit starts from the unedited weights, so cases are
independent. The edited pass reuses the unedited pass's activations below the recorded layer only
when no edit of the chunk (so far) changed a layer below it.

With ``batch`` B > 1, step 2 edits B consecutive cases at a time in one ``edit`` call (batch editing,
e.g. MEMIT's joint update); their records share that call's statistics: ``steps`` and ``edit_s`` are
the batch's divided by its size (so means over cases stay per case), ``losses`` and ``final_loss`` are
the batch's.

``edit_cases`` is single editing of several cases at once (``--parallel B``): each case is edited against
the unedited weights as ``edit_chunk`` edits it alone, but B cases share every forward pass, of the
edit and of the evaluation (``Editor.edit_parallel``, ``Evaluator.before_cases`` / ``after_cases``).
Its records are those of the cases edited one at a time, up to floating-point summation order;
``edit_s`` and ``eval_s`` are each case's share of the group's time.

A record's ``losses`` are the objective's loss at every forward pass, ``extra_losses`` (when the
editor has any) its regularisers', kept apart so that neither a stop rule nor a reader mixes them.
``step_budgets`` maps case ids to an exact number of updates: the matched-steps control.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import EditError, Editor, EditStack, EditStats
from overtone.evaluation.teacher_forced import METRICS, Evaluator, PreEdit, PreEdits

EVAL_TIMINGS = ("end", "after-each")
# Column order of summaries and tables; an evaluator's metrics come in this order.
METRIC_ORDER = (*METRICS, "sng_hop", "mlt_hop")


class RunError(RuntimeError):
    """A case failed; results of the cases before it are on disk and a restart resumes after them."""


class CaseError(RuntimeError):
    """Editing or evaluating one case failed; the message names the case. The model is left unedited."""

    def __init__(self, case_id: str, cause: Exception) -> None:
        super().__init__(f"case {case_id} failed: {cause}")
        self.case_id = case_id


def _edit_fields(stats: Sequence[EditStats], batch: int = 1) -> dict[str, Any]:
    """Edit statistics of a case: its one edit's, or sums (and per-edit losses) over a bundle's edits.

    A case edited in a batch of ``batch`` cases gets that share of the batch's steps and time.
    """
    def rounded(values: list[float]) -> list[float]:
        return [round(x, 6) for x in values]

    if len(stats) == 1:
        losses: list[Any] = rounded(stats[0].losses)
        extra: list[Any] = rounded(stats[0].extra_losses)
    else:
        losses = [rounded(s.losses) for s in stats]
        extra = [rounded(s.extra_losses) for s in stats] if any(s.extra_losses for s in stats) else []
    steps = sum(s.steps for s in stats)
    reasons = {s.stop_reason for s in stats}
    return {
        "steps": steps if batch == 1 else steps / batch,
        "stopped_early": all(s.stopped_early for s in stats),
        "stop_reason": reasons.pop() if len(reasons) == 1 else None,
        "final_loss": stats[-1].losses[-1] if stats[-1].losses else None,
        "losses": losses,
        **({"extra_losses": extra} if extra else {}),
        "edit_s": round(sum(s.time_s for s in stats) / batch, 4),
    }


def _evaluate(evaluator: Evaluator, pre: PreEdit, stack: EditStack) -> dict[str, Any]:
    cache = pre.predictions.cache
    replay = cache is not None and stack.first_layer is not None and stack.first_layer >= cache.start
    return evaluator.after(pre, replay)


def edit_chunk(
    editor: Editor, evaluator: Evaluator, cases: Sequence[EditCase], eval_timing: str = "end", batch: int = 1,
    step_budgets: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Result records of ``cases`` edited in sequence (``batch`` cases per edit) and evaluated at ``eval_timing``.

    ``step_budgets``: exact updates per case id (every case of the chunk must have one).
    """
    if eval_timing not in EVAL_TIMINGS:
        raise ValueError(f"unknown eval timing {eval_timing!r}; choose one of {', '.join(EVAL_TIMINGS)}")
    if batch < 1:
        raise ValueError(f"the batch size must be >= 1, got {batch}")
    if step_budgets is not None:
        if batch > 1 or any(len(c.requests) > 1 for c in cases):
            raise ValueError("matched steps need one edit per case and edit call (no --batch, no bundled cases)")
        missing = [c.case_id for c in cases if c.case_id not in step_budgets]
        if missing:
            raise ValueError(f"no step budget for case(s) {', '.join(missing)}")
    pending: list[PreEdit | None] = []
    for case in cases:
        try:
            pending.append(evaluator.before(case, record_from=editor.first_layer))
        except ValueError as exc:
            raise CaseError(case.case_id, exc) from exc
    stack = EditStack()
    stats: list[list[EditStats]] = []
    sizes = [1] * len(cases)  # how many cases shared each case's edit call
    results: list[dict[str, Any] | None] = [None] * len(cases)

    def evaluate(i: int) -> None:
        pre = pending[i]
        assert pre is not None
        pending[i] = None  # its recorded activations are not needed any more
        try:
            results[i] = _evaluate(evaluator, pre, stack)
        except ValueError as exc:
            raise CaseError(cases[i].case_id, exc) from exc

    try:
        for first in range(0, len(cases), batch):
            group = cases[first: first + batch]
            try:
                if batch == 1:
                    budget = None if step_budgets is None else step_budgets[group[0].case_id]
                    stats.append([stack.push(editor.edit([request], steps=budget)).stats
                                  for request in group[0].requests])
                else:
                    shared = stack.push(editor.edit([r for case in group for r in case.requests])).stats
                    stats += [[shared]] * len(group)
                    sizes[first: first + len(group)] = [len(group)] * len(group)
            except (EditError, ValueError) as exc:
                raise CaseError(", ".join(c.case_id for c in group), exc) from exc
            if eval_timing == "after-each":
                for i in range(first, first + len(group)):
                    evaluate(i)
        if eval_timing == "end":
            for i in range(len(cases)):
                evaluate(i)
    finally:
        stack.revert()
    return [_record(case, result, case_stats, size)
            for case, result, case_stats, size in zip(cases, results, stats, sizes, strict=True)]


def _record(case: EditCase, result: dict[str, Any] | None, stats: Sequence[EditStats], size: int) -> dict[str, Any]:
    assert result is not None
    seconds = result.pop("eval_s")
    return {"case_id": case.case_id, **result, **_edit_fields(stats, size), "eval_s": round(seconds, 4)}


def check_parallel_cases(cases: Sequence[EditCase]) -> None:
    """Parallel editing takes cases of one edit each: a bundle's edits build on each other, in order."""
    bundle = next((c for c in cases if len(c.requests) > 1), None)
    if bundle is not None:
        raise ValueError(f"case {bundle.case_id} bundles {len(bundle.requests)} edits applied in order (MQuAKE); "
                         "--parallel edits cases of one edit each: use --parallel 1")


def edit_cases(
    editor: Editor, evaluator: Evaluator, cases: Sequence[EditCase], parallel: int | None = None,
    step_budgets: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Result records of independent cases edited ``parallel`` at a time (all at once when None), each as
    ``edit_chunk`` gives it for the case alone, up to floating-point summation order; in case order.

    Cases of similar length share a group (the edit sequences of a group are padded to the longest),
    which changes nothing in a case's result. The model is left unedited. ``step_budgets``: exact
    updates per case id (every case must have one).
    """
    check_parallel_cases(cases)
    missing = [c.case_id for c in cases if step_budgets is not None and c.case_id not in step_budgets]
    if missing:
        raise ValueError(f"no step budget for case(s) {', '.join(missing)}")
    size = parallel or len(cases)
    tokenizer = evaluator.lm.tokenizer
    order = sorted(range(len(cases)), key=lambda i: len(tokenizer(f"{cases[i].prompt} {cases[i].target}").input_ids))
    records: dict[int, dict[str, Any]] = {}
    for first in range(0, len(order), size):
        group = order[first: first + size]
        records.update(zip(group, _edit_group(editor, evaluator, [cases[i] for i in group], step_budgets),
                           strict=True))
    return [records[i] for i in range(len(cases))]


def _edit_group(editor: Editor, evaluator: Evaluator, cases: Sequence[EditCase],
                step_budgets: Mapping[str, int] | None) -> list[dict[str, Any]]:
    """One ``edit_parallel`` call and its batched evaluation."""
    ids = [c.case_id for c in cases]
    budgets = None if step_budgets is None else [step_budgets[i] for i in ids]
    try:
        pre: PreEdits = evaluator.before_cases(cases, record_from=editor.first_layer)
        edits = editor.edit_parallel(cases, steps=budgets)
        results = evaluator.after_cases(pre, edits, pre.replayable(edits.first_layer))
    except (EditError, ValueError) as exc:
        raise CaseError(", ".join(ids), exc) from exc
    return [_record(case, result, [stats], 1) for case, result, stats in zip(cases, results, edits.stats, strict=True)]


def edit_and_score(editor: Editor, evaluator: Evaluator, case: EditCase) -> dict[str, Any]:
    """Result record of one independent edit: pre/post metrics, edit statistics and timings."""
    return edit_chunk(editor, evaluator, [case])[0]


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def _ordered(keys: set[str]) -> list[str]:
    return [m for m in METRIC_ORDER if m in keys] + sorted(keys - set(METRIC_ORDER))


def summarize(records: Sequence[dict[str, Any]], metrics: Sequence[str] | None = None) -> dict[str, Any]:
    """Means x100 as in the paper's tables; Avg. is the mean of the metrics that have a value.

    A metric is averaged over the cases of a chunk that have probes for it (every ZsRE case has all
    four; WikiBio has no Gen. and Por.), then over the chunks (records without a ``chunk`` are chunks
    of one: single editing). ``metrics`` defaults to the keys of the records' post metrics.
    """
    if metrics is None:
        metrics = _ordered({m for r in records for m in r["post"]})
    chunks: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for i, r in enumerate(records):
        chunks[r.get("chunk", f"case {i}")].append(r)

    def over_chunks(part: str, metric: str) -> float | None:
        return _mean([_mean([r[part].get(metric) for r in chunk]) for chunk in chunks.values()])

    post = {m: over_chunks("post", m) for m in metrics}
    pre = {m: over_chunks("pre", m) for m in _ordered({m for r in records for m in r["pre"]})}
    present = [v for v in post.values() if v is not None]
    summary: dict[str, Any] = {m: None if v is None else round(100 * v, 2) for m, v in post.items()}
    summary["avg"] = round(100 * sum(present) / len(present), 2) if present else None
    summary["pre"] = {m: None if v is None else round(100 * v, 2) for m, v in pre.items()}
    summary["n_cases"] = len(records)
    summary["n_chunks"] = len(chunks)
    summary["mean_steps"] = _mean([r["steps"] for r in records])
    summary["mean_edit_s"] = _mean([r["edit_s"] for r in records])
    summary["mean_eval_s"] = _mean([r["eval_s"] for r in records])
    return summary
