"""The optimisation loop shared by every gradient-based editor.

An editor supplies what differs (which parameters, which extra loss terms, what happens after an
update); the loop does what is the same everywhere: score the target tokens with the objective, fail
cleanly on a non-finite loss, report each step, stop early, count steps.

Stop rules read the objective's loss only, never the sum with an editor's regulariser (AdaLoRA's
orthogonality term, ROME's KL and weight decay): a threshold on the sum would fire on the
regulariser's decay, not on the edit being learnt. The default is each host editor's own loop:

* ``stop_loss`` > 0: the step is skipped and training stops once the objective's loss is below it
  (the reference toolkit's FT-M rule; 0 never stops on the loss, as its LoRA and MELO);
* ``stop_when_clipped`` (off by default; this project's addition, not the paper's): stop once the
  objective clips every target token. Without it an OverTone edit whose tokens are all clipped keeps
  stepping, and Adam's momentum keeps moving the weights, as inside the reference toolkit's editors;
* an editor may replace both with its own rule (``stop``: WISE's settled total loss).

A stop decision is made on the forward pass the step was computed from, or, for an editor that
trains with dropout, on an extra forward without it (``check``), so a lucky dropout mask cannot end
training. With ``exact_steps`` the loop makes exactly that many updates and no stop rule applies.

``optimise_cases`` is the same loop for a parallel edit (``editors/parallel.py``): B independent cases
in one batch, each with its own loss (the mean over its own rows), its own regulariser, stop, step
budget and ``on_step`` report; a case that stops leaves the batch with its optimiser state.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import field
from typing import Any, Protocol

import torch

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import EditError
from overtone.editors.parallel import CaseParameters
from overtone.editors.reports import EditStats, StepCallback, StepInfo
from overtone.models.adapters import ModelAdapter
from overtone.models.per_case import CaseRows, select_rows
from overtone.models.replay import SuffixCache, forward_hidden, forward_suffix
from overtone.objectives import Objective, ObjectiveOutput
from overtone.tokens import PairBatch


def stop_when_clipped_field() -> Any:
    """The config field of the all-clipped stop, declared once for every gradient editor's config."""
    return field(
        default=False,
        metadata={"help": "stop once the objective clips every target token (this project's addition; "
                          "off: the host editor's own loop, as in the paper)"},
    )


class LogitSource(Protocol):
    """What ``optimise`` scores: a call returns logits [B, T, V] at ``labels`` [B, T] for the current
    parameters; ``reference`` holds the first call's (unedited) logits once it has run."""

    labels: torch.Tensor
    reference: torch.Tensor | None

    def __call__(self) -> torch.Tensor: ...


class TargetLogits:
    """Logits [B, T, V] at the target tokens of an edit batch, for the model's current weights.

    The first call runs the full model and records the inputs of blocks ``start..N-1``; later calls
    run only those blocks (valid because an editor with ``first_layer == start`` changes nothing
    below). The vocabulary head runs only at the target positions, in float32. The first call's logits are
    kept as ``reference`` for objectives that need them, unless one is given (``Editor.reference_for``: the
    unedited model's, when earlier edits of a sequence are applied).

    For a parallel edit (one row per case), every pass runs inside ``context()`` (the per-case changes
    of the rows) and ``keep`` drops the rows of the cases that stopped.
    """

    def __init__(self, adapter: ModelAdapter, batch: PairBatch, start: int,
                 context: Callable[[], AbstractContextManager[Any]] | None = None,
                 reference: torch.Tensor | None = None) -> None:
        self.adapter = adapter
        self.batch = batch
        self.labels = batch.labels
        self.start = start
        self.context = context or contextlib.nullcontext
        self.cache: SuffixCache | None = None
        self.reference: torch.Tensor | None = reference  # else the first call's logits
        self.rows = CaseRows.consecutive([1] * batch.input_ids.size(0), batch.attention_mask.sum(dim=-1).tolist())

    def __call__(self) -> torch.Tensor:
        with self.context():
            if self.cache is None:
                hidden, self.cache = forward_hidden(
                    self.adapter, self.batch.input_ids, self.batch.attention_mask, record_from=self.start
                )
            else:
                hidden = forward_suffix(self.adapter, self.cache)
        logits = self.adapter.logits(self.batch.gather(hidden), fp32=True)
        if self.reference is None:
            self.reference = logits.detach()
        return logits

    def keep(self, positions: Sequence[int]) -> None:
        """Keep the rows (cases) at ``positions`` only, with their recorded activations and reference logits."""
        if list(positions) == list(range(self.rows.n_cases)):
            return
        self.rows, rows = self.rows.select(positions)
        index = torch.tensor(rows, dtype=torch.long, device=self.labels.device)
        self.batch = PairBatch(*(t[index] for t in (self.batch.input_ids, self.batch.attention_mask,
                                                     self.batch.positions, self.batch.labels)))
        self.labels = self.batch.labels
        if self.cache is not None:
            self.cache = select_rows(self.cache, rows)
        if self.reference is not None:
            self.reference = self.reference[index]


StopRule = Callable[[float, float | None, ObjectiveOutput], str | None]


def default_stop(stop_loss: float, stop_when_clipped: bool) -> StopRule:
    """The host editors' rule: the objective's loss below ``stop_loss``, or (optionally) every token clipped.

    The comparison is made in the loss's own precision (float32): the threshold is rounded to it first.
    Compared in float64, float32(0.01) = 0.0099999998 counted as below 0.01, so an OverTone edit whose
    every token sits at the floor ε = 0.01 stopped, and whether it did depended on rounding (docs/method.md).
    """
    threshold = float(torch.tensor(stop_loss, dtype=torch.float32))

    def rule(loss: float, _extra: float | None, out: ObjectiveOutput) -> str | None:
        if loss < threshold:
            return "loss"
        if stop_when_clipped and out.active_tokens == 0:
            return "clipped"
        return None

    return rule


def _check_finite(names: str, objective: Objective, loss: float, extra: float | None, step: int) -> None:
    for term, value in (("loss", loss), ("regulariser", extra)):
        if value is not None and not math.isfinite(value):
            raise EditError(
                f"case {names}: the {objective.name} {term} is {value} at step {step}; the weights were restored"
            )


def optimise(
    cases: Sequence[EditCase],
    objective: Objective,
    target_logits: LogitSource,
    update: Callable[[torch.Tensor], None],
    steps: int,
    stop: StopRule,
    on_step: StepCallback | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    check: Callable[[], torch.Tensor] | None = None,
    exact_steps: int | None = None,
) -> EditStats:
    """Run up to ``steps`` updates (exactly ``exact_steps`` when given); ``update(loss)`` back-propagates
    the objective's loss plus ``extra_loss()`` and applies one step.

    ``stop(loss, extra, output)`` names the reason to stop before this pass's update, or returns None;
    ``loss`` is the objective's alone. ``check()``, when given, returns logits for the stop decision
    from a forward pass without dropout (no gradient is needed). An edit that spends its budget makes
    one more pass after its last update, so its last recorded loss is the edited model's (what the
    divergence rule reads), not the loss before the last update.
    """
    stats = EditStats()
    labels = target_logits.labels
    names = ", ".join(c.case_id for c in cases)
    budget = steps if exact_steps is None else exact_steps
    if budget < 0:
        raise ValueError(f"case {names}: a step budget must be >= 0, got {budget}")
    while True:
        logits = target_logits()
        out: ObjectiveOutput = objective(logits, labels, target_logits.reference)
        extra = extra_loss() if extra_loss is not None else None
        loss = out.loss.item()
        extra_value = None if extra is None else extra.item()
        _check_finite(names, objective, loss, extra_value, stats.steps)
        stats.losses.append(loss)
        if extra_value is not None:
            stats.extra_losses.append(extra_value)
        if on_step is not None:
            on_step(StepInfo(step=stats.steps, loss=loss, output=out, cases=cases, logits=logits.detach(),
                             labels=labels, extra_loss=extra_value))
        if stats.steps == budget:  # the budget is spent: this pass measured the edited model
            break
        if exact_steps is None:
            decision = out
            if check is not None:
                with torch.no_grad():
                    decision = objective(check(), labels, target_logits.reference)
            reason = stop(decision.loss.item(), extra_value, decision)
            if reason is not None:
                stats.stopped_early, stats.stop_reason = True, reason
                break
        update(out.loss if extra is None else out.loss + extra)
        stats.count(out)
        stats.steps += 1
    return stats


class CaseLogitSource(Protocol):
    """What ``optimise_cases`` scores: the logits [R, T, V] of the cases still training, their rows
    consecutive and in case order (``rows``); ``keep(positions)`` drops the other cases' rows."""

    labels: torch.Tensor
    reference: torch.Tensor | None
    rows: CaseRows

    def __call__(self) -> torch.Tensor: ...

    def keep(self, positions: Sequence[int]) -> None: ...


def optimise_cases(
    cases: Sequence[EditCase],
    objective: Objective,
    source: CaseLogitSource,
    params: CaseParameters,
    steps: int,
    stop: StopRule,
    on_step: StepCallback | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    check: Callable[[], torch.Tensor] | None = None,
    exact_steps: Sequence[int | None] | None = None,
    after_step: Callable[[], None] | None = None,
    view: Callable[[int], AbstractContextManager[Any]] | None = None,
) -> list[EditStats]:
    """``optimise`` for independent cases edited at once: one ``EditStats`` per case, each as if alone.

    Every pass scores the cases still training; case i's loss is the mean over its own rows
    (``ObjectiveOutput.group_loss``), ``extra_loss()`` gives one regulariser per case, and the update
    back-propagates the sum of the continuing cases' terms, so each case's parameters get exactly its
    own gradient. A case is judged by its own stop rule (or runs exactly ``exact_steps[i]`` updates when
    given) and leaves the batch (``source.keep``, ``params.keep``) when it stops, or at the pass after its
    last update once it has spent its budget (that pass records its final loss, as in ``optimise``).
    ``after_step`` runs after every update (projections such as clamps); ``view(p)`` is a context in
    which forward passes see the present weights of the case at position ``p`` (``StepInfo.weights``).
    """
    budgets = list(exact_steps) if exact_steps is not None else [None] * len(cases)
    if len(budgets) != len(cases):
        raise ValueError(f"{len(budgets)} step budgets for {len(cases)} cases")
    exact = [b is not None for b in budgets]
    limits = [steps if b is None else b for b in budgets]
    for case, limit in zip(cases, limits, strict=True):
        if limit < 0:
            raise ValueError(f"case {case.case_id}: a step budget must be >= 0, got {limit}")
    stats = [EditStats() for _ in cases]
    active = list(range(len(cases)))  # the case at each position of the batch

    def keep(positions: list[int]) -> None:
        nonlocal active
        source.keep(positions)
        params.keep(positions)
        active = [active[p] for p in positions]

    while active:
        logits = source()
        out = objective(logits, source.labels, source.reference)
        slices = source.rows.slices
        losses = torch.stack([out.group_loss(s) for s in slices])
        extra = extra_loss() if extra_loss is not None else None
        values = losses.tolist()
        extra_values: list[float | None] = extra.tolist() if extra is not None else [None] * len(active)
        for p, i in enumerate(active):
            _check_finite(cases[i].case_id, objective, values[p], extra_values[p], stats[i].steps)
            stats[i].losses.append(values[p])
            if extra_values[p] is not None:
                stats[i].extra_losses.append(extra_values[p])
            if on_step is not None:
                s = slices[p]
                on_step(StepInfo(step=stats[i].steps, loss=values[p], output=out.select(s, losses[p].detach()),
                                 cases=[cases[i]], logits=logits[s].detach(), labels=source.labels[s],
                                 extra_loss=extra_values[p],
                                 weights=None if view is None else (lambda p=p: view(p))))
        spent = {p for p, i in enumerate(active) if stats[i].steps >= limits[i]}
        judged = [p for p, i in enumerate(active) if not exact[i] and p not in spent]
        stopped: set[int] = set(spent)
        if judged:
            decision = out
            if check is not None:
                with torch.no_grad():
                    decision = objective(check(), source.labels, source.reference)
            for p in judged:
                s = slices[p]
                loss = values[p] if decision is out else decision.group_loss(s).item()
                reason = stop(loss, extra_values[p], decision.select(s, decision.group_loss(s).detach()))
                if reason is not None:
                    i = active[p]
                    stats[i].stopped_early, stats[i].stop_reason = True, reason
                    stopped.add(p)
        going = [p for p in range(len(active)) if p not in stopped]
        if going:
            terms = losses if extra is None else losses + extra
            params.backward(terms[going].sum())
        for p in going:
            stats[active[p]].count(out.select(slices[p], losses[p].detach()))
        keep(going)
        if not active:
            break
        params.step()
        if after_step is not None:
            after_step()
        for i in active:
            stats[i].steps += 1
    return stats
