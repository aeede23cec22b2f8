"""Edit streams: thousands of edits in batches, never reverted within the stream, that survive a kill.

The lifelong protocol of AlphaEdit and UltraEdit (docs/lifelong-streams.md): a chunk of T cases is
edited B at a time (``--sequence T --batch B --stream``), each batch on the model the earlier batches
left, and every case is evaluated once, on the final model. What makes that work for T = 10,000:

* the unedited model's evaluation of every case (``Evaluator.before_many``) is made first, in groups,
  without recorded activations (a few KB per case: its tokenised probes and the locality reference);
  the lifelong metrics of the unedited model likewise (``evaluation.lifelong``);
* every ``checkpoint_every`` batches, and once after the last, the stream's edits go into an edit
  artifact under ``<run>/stream/chunk-<i>/edits-<n>`` (``artifacts.save_edit``: the editor's
  ``saved_edit``, its state included), with the per-batch edit statistics and the curve so far in its
  manifest. A restart applies the newest checkpoint (``load_edit(...).apply``, bit for bit), skips the
  batches it covers and goes on. After a restart the editor's live edits start at the checkpoint, so a
  later checkpoint covers the edits since then and names the one it builds on (``from``); a restart
  applies that chain, oldest first. A checkpoint no chain needs any more is deleted;
* the global generators are seeded before every batch (``reseed``), so a batch's edit does not depend on
  whether the process was restarted before it: a resumed stream's records equal an uninterrupted one's;
* every ``curve_every`` edits the model is scored on a fixed sample of the edits made so far (at most
  ``curve_sample`` of them, drawn with a generator seeded by the run's seed and the number of edits);
  with ``--ability-every`` the general ability likewise. Both curves go into every record of the chunk;
* fluency, the costliest score on a CPU (a greedy continuation per edit), is measured on every
  ``fluency_every``-th edit scored (1: all, the protocol; the reference's ``generation_test_interval``);
* memory: the revert handles hold one copy of each edited tensor (``EditStack``), plus one for a
  restored checkpoint; nothing is kept per edit but the records' numbers and the editor's own state.

A stream is reverted at its end, as a chunk is, so the next chunk (or a study's next shard) starts
from the unedited model.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from overtone.artifacts import load_edit, save_edit
from overtone.benchmarks.cases import EditCase
from overtone.editors.base import EditError, Editor, EditStack, EditStats
from overtone.evaluation.ability import AbilityMonitor
from overtone.evaluation.lifelong import CaseRowsError, LifelongScorer, evaluate_together, lifelong_means
from overtone.evaluation.teacher_forced import Evaluator, PreEdit
from overtone.runner.bench import CaseError, EditObserver, _edit, _record, reseed
from overtone.runner.signals import deferred_signals

log = logging.getLogger(__name__)

STREAM_DIR = "stream"
EVAL_GROUP = 64  # cases evaluated per evaluator call (unedited pass, curve, final evaluation)
CHECKPOINT = re.compile(r"edits-(\d+)$")


@dataclass(frozen=True)
class StreamSettings:
    """How a stream checkpoints and what it measures on the way (see the module docstring)."""

    checkpoint_every: int = 10  # batches between checkpoints; 0: none (a kill restarts the stream)
    curve_every: int = 0  # edits between curve points; 0: no curve
    curve_sample: int = 100  # earlier edits scored at a curve point
    fluency_tokens: int = 32  # greedy tokens per rewrite prompt for the fluency; 0: no fluency
    fluency_every: int = 1  # the fluency of every K-th edit scored (the reference's generation_test_interval)

    def __post_init__(self) -> None:
        for name in ("checkpoint_every", "curve_every", "fluency_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("curve_sample", "fluency_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def describe(self) -> dict[str, Any]:
        """What changes results (the checkpoint interval does not: batches are reseeded one by one). The fluency
        interval is named only when it samples, so runs and study cells from before it keep their identity."""
        return {k: v for k, v in asdict(self).items()
                if k != "checkpoint_every" and not (k == "fluency_every" and v == 1)}


def curve_sample(seed: int | None, edits: int, size: int) -> list[int]:
    """The indices of the earlier edits scored after ``edits`` edits: fixed by the seed and ``edits``."""
    return sorted(random.Random(f"stream-curve-{seed}-{edits}").sample(range(edits), min(size, edits)))


def _means(results: Sequence[dict[str, Any]], lifelong: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A curve point's means (x100) of the KnowEdit post metrics and the lifelong metrics."""
    metrics = {m for r in results for m in r["post"]}
    point: dict[str, Any] = {}
    for metric in sorted(metrics):
        values = [r["post"][metric] for r in results if r["post"].get(metric) is not None]
        point[metric] = round(100 * sum(values) / len(values), 2) if values else None
    return {**point, **lifelong_means(lifelong)}


class Checkpoints:
    """The checkpoint folders of one stream (``<run>/stream/chunk-<i>``): written, found, applied, pruned."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, done: int) -> Path:
        return self.folder / f"edits-{done:06d}"

    def _found(self) -> dict[int, dict[str, Any]]:
        """Readable checkpoints by the number of edits they cover: their manifests' stream protocol."""
        found = {}
        if not self.folder.is_dir():
            return found
        for path in self.folder.iterdir():
            match = CHECKPOINT.match(path.name)
            if match and (path / "manifest.json").is_file():
                found[int(match.group(1))] = load_edit(path).manifest["protocol"]["stream"]
            elif path.name.startswith("."):  # a checkpoint a kill cut short (save_edit writes a hidden folder)
                shutil.rmtree(path, ignore_errors=True)
        return found

    def chain(self, done: int, found: dict[int, dict[str, Any]]) -> list[int] | None:
        """The checkpoints to apply, oldest first, to reach ``done`` edits (None: one is missing)."""
        chain = []
        while done:
            if done not in found:
                return None
            chain.append(done)
            done = found[done]["from"]
        return chain[::-1]

    def latest(self) -> tuple[list[int], dict[str, Any]] | None:
        """The chain of the newest complete checkpoint and its stream protocol, or None."""
        found = self._found()
        for done in sorted(found, reverse=True):
            chain = self.chain(done, found)
            if chain is not None:
                return chain, found[done]
        return None

    def apply(self, chain: Sequence[int], editor: Editor, stack: EditStack) -> None:
        """Apply the checkpoints of ``chain`` to the editor's model, their handles on ``stack``."""
        for done in chain:
            artifact = load_edit(self.path(done))
            stack.push(artifact.apply(editor.lm))
            editor.resume_state(artifact.saved)

    def write(self, editor: Editor, done: int, base: int, stream: dict[str, Any]) -> None:
        """Save the editor's live edits as the checkpoint after ``done`` edits, built on checkpoint ``base``;
        then delete the checkpoints that the newest chain no longer needs."""
        with deferred_signals():
            save_edit(editor, self.path(done), protocol={"stream": {**stream, "done": done, "from": base}})
        found = self._found()
        keep = set(self.chain(done, found) or ())
        for old in found:
            if old not in keep:
                shutil.rmtree(self.path(old), ignore_errors=True)


def stream_records(
    editor: Editor, evaluator: Evaluator, cases: Sequence[EditCase], batch: int, settings: StreamSettings,
    seed: int | None, ability: AbilityMonitor | None = None, checkpoints: Path | None = None,
    on_edits: Callable[[int], None] | None = None, observer: EditObserver | None = None,
) -> list[dict[str, Any]]:
    """The records of ``cases`` edited as one stream, ``batch`` cases per edit call (see the module docstring).

    ``checkpoints``: the stream's checkpoint folder (None: no checkpoints, as in a study's worker);
    ``on_edits(n)`` is called as n more cases are edited (or skipped by a restored checkpoint).
    """
    scorer = LifelongScorer(editor.lm, settings.fluency_tokens, settings.fluency_every)
    pres, lifelong_pre = _evaluated(evaluator, scorer, cases, None)
    if ability:
        ability.measure_reference()
    store = Checkpoints(checkpoints) if checkpoints is not None else None
    restored, stack = EditStack(), EditStack()  # apart, so reverting the live edits also clears the editor's log
    stats: list[dict[str, Any]] = []  # per batch, its EditStats as a dict
    curve: list[dict[str, Any]] = []
    ability_curve: list[dict[str, Any]] = []
    done = base = 0
    try:
        latest = store.latest() if store else None
        if latest is not None:
            assert store is not None
            chain, stream = latest
            store.apply(chain, editor, restored)
            done = base = chain[-1]
            stats, curve, ability_curve = stream["stats"], stream["curve"], stream["ability_curve"]
            log.info("stream: resumed from its checkpoint after %d of %d edits (%s)", done, len(cases),
                     store.path(done))
            if on_edits:
                on_edits(done)
        batches = range(done, len(cases), batch)
        for number, first in enumerate(batches, start=1):
            group = cases[first: first + batch]
            reseed(seed)
            try:
                edited = _edit(stack, editor, [r for case in group for r in case.requests], None, observer)
            except (EditError, ValueError) as exc:
                raise CaseError(", ".join(c.case_id for c in group), exc) from exc
            stats.append(edited.as_dict())
            done = first + len(group)
            if on_edits:
                on_edits(len(group))
            every = settings.curve_every
            if every and done < len(cases) and done // every > first // every:  # the end's point comes last
                curve.append(_curve_point(evaluator, scorer, cases, pres, done, settings, seed))
            if ability and ability.due(first, done, len(cases)):
                ability_curve.append({"edits": done, **ability.measure()})
            last = done == len(cases)
            if store and (last or (settings.checkpoint_every and number % settings.checkpoint_every == 0)):
                store.write(editor, done, base, {"batch": batch, "stats": stats, "curve": curve,
                                                 "ability_curve": ability_curve})
        records = _final_records(evaluator, scorer, cases, pres, lifelong_pre, stats, batch)
        measured: dict[str, Any] = {}
        if settings.curve_every:
            measured["curve"] = [*curve, _curve_point(evaluator, scorer, cases, pres, len(cases), settings, seed)]
        if ability:
            measured["ability"] = ability.measure()
            if ability_curve:
                measured["ability_curve"] = [*ability_curve, {"edits": len(cases), **measured["ability"]}]
    finally:
        stack.revert()
        restored.revert()
    for record in records:
        record.update(measured)
    return records


def _curve_point(evaluator: Evaluator, scorer: LifelongScorer, cases: Sequence[EditCase], pres: Sequence[PreEdit],
                 edits: int, settings: StreamSettings, seed: int | None) -> dict[str, Any]:
    """The model after ``edits`` edits, scored on a fixed sample of them."""
    sample = curve_sample(seed, edits, settings.curve_sample)
    results, lifelong = _evaluated(evaluator, scorer, [cases[i] for i in sample], [pres[i] for i in sample])
    point = {"edits": edits, "sample": len(sample), **_means(results, lifelong)}
    log.info("stream: after %d edits, on %d of them: %s", edits, len(sample),
             " ".join(f"{k} {v}" for k, v in point.items() if k not in ("edits", "sample") and v is not None))
    return point


def _final_records(evaluator: Evaluator, scorer: LifelongScorer, cases: Sequence[EditCase],
                   pres: Sequence[PreEdit], lifelong_pre: Sequence[dict[str, Any]],
                   stats: Sequence[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    """Every case of the stream evaluated on the final model, in groups; its batch's statistics shared."""
    log.info("stream: evaluating all %d edits on the final model", len(cases))
    results, lifelong_post = _evaluated(evaluator, scorer, cases, pres)
    records = []
    for i, (case, result) in enumerate(zip(cases, results, strict=True)):
        size = min(batch, len(cases) - i // batch * batch)
        record = _record(case, result, [EditStats(**stats[i // batch])], size, {})
        record["lifelong"] = {"pre": lifelong_pre[i], "post": lifelong_post[i]}
        records.append(record)
    return records


def _evaluated(evaluator: Evaluator, scorer: LifelongScorer, cases: Sequence[EditCase],
               pres: Sequence[PreEdit] | None) -> tuple[list[Any], list[dict[str, Any]]]:
    """The cases on the model as it is: without ``pres`` their ``PreEdit``s and comparisons (the unedited model),
    with them their results and lifelong metrics (fluency included). The teacher-forced evaluator's rows and
    the comparisons' go through the model together (``evaluate_together``); another evaluator (wild, MQuAKE)
    evaluates its cases ``EVAL_GROUP`` at a time, and the comparisons follow."""
    if type(evaluator) is Evaluator:
        try:
            return evaluate_together(evaluator, scorer, cases, pres)
        except CaseRowsError as exc:
            raise CaseError(exc.case_id, exc) from exc
    out: list[Any] = []
    for first in range(0, len(cases), EVAL_GROUP):
        group = range(first, min(first + EVAL_GROUP, len(cases)))
        try:
            if pres is None:
                out += evaluator.before_many([cases[i] for i in group], record_from=None)
            else:
                out += evaluator.after_many([pres[i] for i in group], [False] * len(group))
        except ValueError as exc:
            raise CaseError(", ".join(cases[i].case_id for i in group), exc) from exc
    return out, scorer.score(cases, fluency_of=pres is not None)
