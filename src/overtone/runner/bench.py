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

With an ``AbilityMonitor``, the edited model's general ability (held-out perplexity, general facts) is
measured after step 3, before the revert, and stored in every record of the chunk under ``ability``
next to the unedited model's (measured once, before the first edit of the run). When the monitor measures
every K edits as well, the records also hold ``ability_curve``: one measurement per K edits (``edits``:
how many cases of the chunk were edited then), the chunk's end last.

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

A record is flagged ``diverged`` when an edit's objective loss ended above where it started (or is
not finite), or when the edited model's prediction at the rewrite's answer tokens is a flat
distribution (``flatness``, the entropy as a fraction of ln |V|, above ``FLAT``): such an edit
did not fail, but its scores say nothing about the method.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import EditError, EditHandle, Editor, EditStack, EditStats, StepCallback
from overtone.evaluation.ability import AbilityMonitor
from overtone.evaluation.lifelong import LIFELONG_METRICS, lifelong_means
from overtone.evaluation.teacher_forced import METRICS, Evaluator, PreEdit, PreEdits
from overtone.evaluation.wild import SCORES, WILD, protocol_records
from overtone.runner.store import case_ids_digest

if TYPE_CHECKING:
    from overtone.editors.parallel import CaseEdits

EVAL_TIMINGS = ("end", "after-each")
# Column order of summaries and tables; an evaluator's metrics come in this order.
METRIC_ORDER = (*METRICS, "sng_hop", "mlt_hop")
# Flatness (entropy / ln |V|) above which the edited model's prediction counts as a flat distribution;
# an unedited or normally edited model is far below (SmolLM2: ln |V| = 10.8 nats, edited targets < 2).
FLAT = 0.9


class RunError(RuntimeError):
    """A case failed; results of the cases before it are on disk and a restart resumes after them."""


class CaseError(RuntimeError):
    """Editing or evaluating one case failed; the message names the case. The model is left unedited."""

    def __init__(self, case_id: str, cause: Exception) -> None:
        super().__init__(f"case {case_id} failed: {cause}")
        self.case_id = case_id


def reseed(seed: int | None) -> None:
    """Seed the global generators before a chunk (a window of parallel cases, a stream's batch), so that its
    records do not depend on what ran before it: the one seeding rule of every run (None: leave them)."""
    if seed is not None:
        torch.manual_seed(seed)
        random.seed(seed)


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
    total = EditStats()
    for s in stats:
        total.add_activity(s.activity)
    activity = total.activity
    return {
        "steps": steps if batch == 1 else steps / batch,
        "stopped_early": all(s.stopped_early for s in stats),
        "stop_reason": reasons.pop() if len(reasons) == 1 else None,
        "final_loss": stats[-1].losses[-1] if stats[-1].losses else None,
        "losses": losses,
        **({"extra_losses": extra} if extra else {}),
        **({"activity": activity} if activity.get("tokens") else {}),
        "edit_s": round(sum(s.time_s for s in stats) / batch, 4),
    }


def divergence(record: dict[str, Any]) -> str | None:
    """Why a result record counts as diverged (see the module docstring), or None."""
    losses = record.get("losses") or []
    runs = losses if losses and isinstance(losses[0], list) else [losses]  # a bundle: one list per edit
    reasons = [f"objective loss {run[0]:.4g} -> {run[-1]:.4g}" for run in runs
               if run and (not all(math.isfinite(x) for x in run) or run[-1] > run[0])]
    flatness = record.get("flatness")
    if flatness is not None and flatness > FLAT:
        reasons.append(f"the edited model's prediction at the target is flat (entropy {flatness:.2f} x ln|V|)")
    return "; ".join(reasons) or None


def likely_cause(editor: Editor) -> str:
    """The setting that most often makes an edit diverge: the step size."""
    lr = getattr(editor.config, "lr", None)
    if lr is None:
        return f"a setting of {editor.name}"
    return f"{editor.name}'s learning rate lr={lr:g} (try a smaller one: --lr or --set lr=...)"


class EditObserver(Protocol):
    """Sees every edit call of a run while its edit is applied (``overtone trace`` records token traces with
    one): ``on_step`` gives the call's step callback, ``edited`` its result before anything is reverted."""

    def on_step(self, editor: Editor, cases: Sequence[EditCase]) -> StepCallback: ...

    def edited(self, result: EditHandle | CaseEdits) -> None: ...


def _edit(stack: EditStack, editor: Editor, requests: Sequence[EditCase], steps: int | None,
          observer: EditObserver | None) -> EditStats:
    """One edit call, its handle pushed on ``stack`` (so an error reverts it), shown to ``observer``."""
    given: dict[str, Any] = {"steps": steps} if steps is not None else {}
    if observer:
        given["on_step"] = observer.on_step(editor, requests)
    handle = stack.push(editor.edit(requests, **given))
    if observer:
        observer.edited(handle)
    return handle.stats


def _replay(pre: PreEdit | None, stack: EditStack) -> bool:
    """Whether the edits so far left every layer below the recorded one unchanged (the cheaper edited pass)."""
    cache = pre.cache if pre is not None else None
    return cache is not None and stack.first_layer is not None and stack.first_layer >= cache.start


def capture_references(editor: Editor, requests: Sequence[EditCase]) -> dict[str, torch.Tensor]:
    """The unedited model's target logits of every request, as the editor scores them: one pass of each
    request's own edit with no update (``steps=0``), reverted at once.

    What an objective that needs a reference ("w/o dyn": the prior from the unedited model) reads in a sequence
    of edits (``Editor.references``), where an edit's own first pass already sees the earlier edits of the
    sequence (and, for LoRA, a dropout sample)."""
    captured: dict[str, torch.Tensor] = {}
    for request in requests:
        rows: list[torch.Tensor] = []
        editor.edit([request], on_step=lambda info, rows=rows: rows.append(info.logits) if info.step == 0 else None,
                    steps=0).revert()
        captured[request.case_id] = torch.cat(rows)
    return captured


def edit_chunk(
    editor: Editor, evaluator: Evaluator, cases: Sequence[EditCase], eval_timing: str = "end", batch: int = 1,
    step_budgets: Mapping[str, int] | None = None, keep: EditStack | None = None,
    ability: AbilityMonitor | None = None, pending: Sequence[PreEdit] | None = None,
    observer: EditObserver | None = None,
) -> list[dict[str, Any]]:
    """Result records of ``cases`` edited in sequence (``batch`` cases per edit) and evaluated at ``eval_timing``.

    ``step_budgets``: exact updates per case id (every case of the chunk must have one). With ``keep`` the
    edits stay applied, their handles on that (empty) stack, instead of being reverted at the end (step 4):
    ``overtone edit`` saves them. They are reverted when an error interrupts the chunk. ``ability``: the
    general ability of the model with every edit of the chunk applied. ``pending``: the cases' evaluation
    on the unedited model when the caller already made it (``Evaluator.before_many``). ``observer`` sees
    every edit call (``EditObserver``).
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
    if pending is None:
        try:  # one call, so an evaluator may batch the chunk's cases (the wild evaluator generates for all at once)
            pending = evaluator.before_many(cases, record_from=editor.first_layer)
        except ValueError as exc:
            raise CaseError(", ".join(c.case_id for c in cases), exc) from exc
    if len(pending) != len(cases):
        raise ValueError(f"{len(pending)} unedited-model evaluations for {len(cases)} cases")
    waiting: list[PreEdit | None] = list(pending)
    del pending  # each case's recorded activations are freed as soon as it is evaluated
    if ability:
        ability.measure_reference()  # the model is unedited here
    requests = [request for case in cases for request in case.requests]
    if len(requests) > 1 and editor.objective is not None and editor.objective.needs_reference:
        try:
            editor.references = capture_references(editor, requests)
        except (EditError, ValueError) as exc:
            raise CaseError(", ".join(c.case_id for c in cases), exc) from exc
    stack = keep if keep is not None else EditStack()
    stats: list[list[EditStats]] = []
    sizes = [1] * len(cases)  # how many cases shared each case's edit call
    results: list[dict[str, Any] | None] = [None] * len(cases)
    curve: list[dict[str, Any]] = []  # the general ability after every K edits (``ability.due``)

    def evaluate(indices: range) -> None:
        """Evaluate these cases on the model as it is now, in one ``after_many`` call."""
        pres = [waiting[i] for i in indices]
        for i in indices:
            waiting[i] = None  # their recorded activations are not needed any more
        try:
            out = evaluator.after_many(pres, [_replay(pre, stack) for pre in pres])
        except ValueError as exc:
            raise CaseError(", ".join(cases[i].case_id for i in indices), exc) from exc
        for i, result in zip(indices, out, strict=True):
            results[i] = result

    try:
        for first in range(0, len(cases), batch):
            group = cases[first: first + batch]
            try:
                if batch == 1:
                    budget = None if step_budgets is None else step_budgets[group[0].case_id]
                    stats.append([_edit(stack, editor, [request], budget, observer) for request in group[0].requests])
                else:
                    shared = _edit(stack, editor, [r for case in group for r in case.requests], None, observer)
                    stats += [[shared]] * len(group)
                    sizes[first: first + len(group)] = [len(group)] * len(group)
            except (EditError, ValueError) as exc:
                raise CaseError(", ".join(c.case_id for c in group), exc) from exc
            if eval_timing == "after-each":
                evaluate(range(first, first + len(group)))
            if ability and ability.due(first, first + len(group), len(cases)):
                curve.append({"edits": first + len(group), **ability.measure()})
        if eval_timing == "end":
            evaluate(range(len(cases)))
        measured = {"ability": ability.measure()} if ability else {}
        if curve:
            measured["ability_curve"] = [*curve, {"edits": len(cases), **measured["ability"]}]
    except BaseException:
        stack.revert()
        raise
    finally:
        editor.references = {}
    if keep is None:
        stack.revert()
    return [_record(case, result, case_stats, size, measured)
            for case, result, case_stats, size in zip(cases, results, stats, sizes, strict=True)]


def _record(case: EditCase, result: dict[str, Any] | None, stats: Sequence[EditStats], size: int,
            measured: dict[str, Any]) -> dict[str, Any]:
    assert result is not None
    seconds = result.pop("eval_s")
    record = {"case_id": case.case_id, **result, **_edit_fields(stats, size), "eval_s": round(seconds, 4), **measured}
    record["diverged"] = divergence(record) is not None
    return record


def check_parallel_cases(cases: Sequence[EditCase]) -> None:
    """Parallel editing takes cases of one edit each: a bundle's edits build on each other, in order."""
    bundle = next((c for c in cases if len(c.requests) > 1), None)
    if bundle is not None:
        raise ValueError(f"case {bundle.case_id} bundles {len(bundle.requests)} edits applied in order (MQuAKE); "
                         "--parallel edits cases of one edit each: use --parallel 1")


def edit_cases(
    editor: Editor, evaluator: Evaluator, cases: Sequence[EditCase], parallel: int | None = None,
    step_budgets: Mapping[str, int] | None = None, ability: AbilityMonitor | None = None,
    observer: EditObserver | None = None,
) -> list[dict[str, Any]]:
    """Result records of independent cases edited ``parallel`` at a time (all at once when None), each as
    ``edit_chunk`` gives it for the case alone, up to floating-point summation order; in case order.

    Cases of similar length share a group (the edit sequences of a group are padded to the longest),
    which changes nothing in a case's result. The model is left unedited. ``step_budgets``: exact
    updates per case id (every case must have one). ``ability``: each case's edited model's general ability.
    ``observer`` sees every ``edit_parallel`` call.
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
        records.update(zip(group, _edit_group(editor, evaluator, [cases[i] for i in group], step_budgets, ability,
                                              observer), strict=True))
    return [records[i] for i in range(len(cases))]


def _edit_group(editor: Editor, evaluator: Evaluator, cases: Sequence[EditCase],
                step_budgets: Mapping[str, int] | None, ability: AbilityMonitor | None,
                observer: EditObserver | None) -> list[dict[str, Any]]:
    """One ``edit_parallel`` call and its batched evaluation."""
    ids = [c.case_id for c in cases]
    budgets = None if step_budgets is None else [step_budgets[i] for i in ids]
    try:
        pre: PreEdits = evaluator.before_cases(cases, record_from=editor.first_layer)
        if ability:
            ability.measure_reference()  # the model is unedited here
        edits = editor.edit_parallel(cases, on_step=observer.on_step(editor, cases) if observer else None,
                                     steps=budgets)
        if observer:
            observer.edited(edits)
        results = evaluator.after_cases(pre, edits, pre.replayable(edits.first_layer))
    except (EditError, ValueError) as exc:
        raise CaseError(", ".join(ids), exc) from exc
    measured = []
    for i in range(len(cases)):
        if ability:
            with edits.only(i):
                measured.append({"ability": ability.measure()})
        else:
            measured.append({})
    return [_record(case, result, [stats], 1, more)
            for case, result, stats, more in zip(cases, results, edits.stats, measured, strict=True)]


def edit_and_score(editor: Editor, evaluator: Evaluator, case: EditCase) -> dict[str, Any]:
    """Result record of one independent edit: pre/post metrics, edit statistics and timings."""
    return edit_chunk(editor, evaluator, [case])[0]


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def _ordered(keys: set[str]) -> list[str]:
    return [m for m in METRIC_ORDER if m in keys] + sorted(keys - set(METRIC_ORDER))


def _chunks(records: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Records grouped by chunk; records without a ``chunk`` are chunks of one (single editing)."""
    chunks: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for i, r in enumerate(records):
        chunks[r.get("chunk", f"case {i}")].append(r)
    return list(chunks.values())


def _x100(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 2)


def _summarize_metrics(records: Sequence[dict[str, Any]], metrics: Sequence[str] | None) -> dict[str, Any]:
    if metrics is None:
        metrics = _ordered({m for r in records for m in r.get("post", {})})
    chunks = _chunks(records)

    def over_chunks(part: str, metric: str) -> float | None:
        return _mean([_mean([r.get(part, {}).get(metric) for r in chunk]) for chunk in chunks])

    post = {m: over_chunks("post", m) for m in metrics}
    pre = {m: over_chunks("pre", m) for m in _ordered({m for r in records for m in r.get("pre", {})})}
    present = [v for v in post.values() if v is not None]
    summary: dict[str, Any] = {m: _x100(v) for m, v in post.items()}
    summary["avg"] = round(100 * sum(present) / len(present), 2) if present else None
    summary["pre"] = {m: _x100(v) for m, v in pre.items()}
    for part in SCORES:  # the wild protocol's other scores
        if any(part in r for r in records):
            summary[part] = {m: _x100(over_chunks(part, m))
                             for m in _ordered({m for r in records for m in r.get(part, {})})}
    summary["n_cases"] = len(records)
    summary["n_diverged"] = sum(bool(r.get("diverged")) for r in records)
    summary["n_chunks"] = len(chunks)
    summary["mean_steps"] = _mean([r["steps"] for r in records])
    summary["mean_edit_s"] = _mean([r["edit_s"] for r in records])
    summary["mean_eval_s"] = _mean([r["eval_s"] for r in records])
    activity = _summarize_activity(records)
    if activity:
        summary["activity"] = activity
    return summary


def _summarize_activity(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The objective's activity pooled over every token update of the run (``EditStats.activity``): the
    percentage of updates whose target differed from the one-hot label (``mixed_pct``), fell back to it
    because the label was not the mode or tied (``fallback_mode_pct``, ``fallback_tie_pct``), or was clipped
    (``clipped_pct``). For CE every one is 0; for OverTone they say how far it is from CE at all."""
    counted = [r["activity"] for r in records if r.get("activity")]
    tokens = sum(a.get("tokens", 0) for a in counted)
    if not tokens:
        return None
    return {"tokens": tokens, **{f"{key}_pct": _x100(sum(a.get(key, 0) for a in counted) / tokens)
                                 for key in ("mixed", "clipped", "fallback_mode", "fallback_tie")}}


def _ability_means(measured: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over chunks of the ability measurements ``measured``; perplexity drift vs the unedited model."""
    ppl, base = _mean([m["ppl"] for m in measured]), _mean([m["ppl_unedited"] for m in measured])
    return {
        "ppl": None if ppl is None else round(ppl, 3),
        "ppl_unedited": None if base is None else round(base, 3),
        "ppl_drift_pct": _x100(_mean([m["ppl"] / m["ppl_unedited"] - 1 for m in measured])),
        "facts_right": _x100(_mean([m["facts_right"] for m in measured])),
        "facts_same": _x100(_mean([m["facts_same"] for m in measured])),
        "n_measured": len(measured),
    }


def _summarize_ability(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per chunk the ability after its edits (shared by its records), averaged over chunks; with
    ``ability_curve`` records, the same after each number of edits measured (``curve``)."""
    measured = [chunk[0]["ability"] for chunk in _chunks([r for r in records if "ability" in r])]
    summary = {**_ability_means(measured), "facts": measured[0]["facts"] if measured else None,
               "mean_s": _mean([m["seconds"] for m in measured])}
    points = [p for chunk in _chunks([r for r in records if "ability_curve" in r]) for p in chunk[0]["ability_curve"]]
    if points:
        summary["curve"] = [{"edits": n, **_ability_means([p for p in points if p["edits"] == n])}
                            for n in sorted({p["edits"] for p in points})]
    return summary


def _summarize_lifelong(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The lifelong metrics (x100, fluency in bits) per stream, averaged over streams, before and after; with
    the streams' curves (``curve`` of their records), each point averaged over streams."""
    chunks = _chunks([r for r in records if "lifelong" in r])
    summary: dict[str, Any] = {}
    for part in ("post", "pre"):
        means = [lifelong_means([r["lifelong"][part] for r in chunk]) for chunk in chunks]
        summary[part] = {m: _round(_mean([c[m] for c in means])) for m in LIFELONG_METRICS}
    points = [p for chunk in chunks for p in chunk[0].get("curve", [])]
    if points:
        keys = [k for k in points[0] if k != "edits"]
        summary["curve"] = [{"edits": n, **{k: _round(_mean([p.get(k) for p in points if p["edits"] == n]))
                                            for k in keys}}
                            for n in sorted({p["edits"] for p in points})]
    return summary


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def summarize(records: Sequence[dict[str, Any]], metrics: Sequence[str] | None = None) -> dict[str, Any]:
    """Means x100 as in the paper's tables; Avg. is the mean of the metrics that have a value.

    A metric is averaged over the cases of a chunk that have probes for it (every ZsRE case has all
    four; WikiBio has no Gen. and Por.), then over the chunks (records without a ``chunk`` are chunks
    of one: single editing). ``metrics`` defaults to the keys of the records' post metrics.

    The top-level metrics are the teacher-forced ones (``pre``/``post`` of the records); wild metrics
    (``wild`` of the records) are summarised the same way under ``wild``; ``protocols`` names the
    protocols present. The general ability after each chunk, when measured, is under ``ability``; the
    lifelong metrics of edit streams (runner/stream.py) and their curves under ``lifelong``;
    ``case_ids_sha256`` names the cases summarised (``store.case_ids_digest``).
    """
    summary = _summarize_metrics(records, metrics)
    summary["case_ids_sha256"] = case_ids_digest(list(records))
    protocols = ["teacher-forced"] if any("post" in r for r in records) or not records else []
    wild = protocol_records(records, WILD)
    if wild:
        protocols.append(WILD)
        block = _summarize_metrics(wild, None)
        rule = [r["study_rule"] for r in wild]
        replies = sum(x["replies"] for x in rule)
        block["study_rule"] = {"replies": replies,
                               "differs_pct": _x100(sum(x["differs"] for x in rule) / replies) if replies else None,
                               "em_changes_pct": _x100(sum(x["em_changes"] for x in rule) / replies)
                               if replies else None}
        summary[WILD] = block
    summary["protocols"] = protocols
    if any("ability" in r for r in records):
        summary["ability"] = _summarize_ability(records)
    if any("lifelong" in r for r in records):
        summary["lifelong"] = _summarize_lifelong(records)
    return summary
