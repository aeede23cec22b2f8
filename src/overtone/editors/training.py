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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import field
from typing import Any, Protocol

import torch

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import EditError, EditStats, StepCallback, StepInfo
from overtone.models.adapters import ModelAdapter
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
    below). The vocabulary head runs only at the target positions, in float32. The first call's logits are the
    unedited model's, kept as ``reference`` for objectives that need them.
    """

    def __init__(self, adapter: ModelAdapter, batch: PairBatch, start: int) -> None:
        self.adapter = adapter
        self.batch = batch
        self.labels = batch.labels
        self.start = start
        self.cache: SuffixCache | None = None
        self.reference: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
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


StopRule = Callable[[float, float | None, ObjectiveOutput], str | None]


def default_stop(stop_loss: float, stop_when_clipped: bool) -> StopRule:
    """The host editors' rule: the objective's loss below ``stop_loss``, or (optionally) every token clipped."""

    def rule(loss: float, _extra: float | None, out: ObjectiveOutput) -> str | None:
        if loss < stop_loss:
            return "loss"
        if stop_when_clipped and out.active_tokens == 0:
            return "clipped"
        return None

    return rule


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
    from a forward pass without dropout (no gradient is needed).
    """
    stats = EditStats()
    labels = target_logits.labels
    names = ", ".join(c.case_id for c in cases)
    budget = steps if exact_steps is None else exact_steps
    if budget < 0:
        raise ValueError(f"case {names}: a step budget must be >= 0, got {budget}")
    for _ in range(budget):
        logits = target_logits()
        out: ObjectiveOutput = objective(logits, labels, target_logits.reference)
        extra = extra_loss() if extra_loss is not None else None
        loss = out.loss.item()
        extra_value = None if extra is None else extra.item()
        for term, value in (("loss", loss), ("regulariser", extra_value)):
            if value is not None and not math.isfinite(value):
                raise EditError(
                    f"case {names}: the {objective.name} {term} is {value} at step {stats.steps}; "
                    "the weights were restored"
                )
        stats.losses.append(loss)
        if extra_value is not None:
            stats.extra_losses.append(extra_value)
        if on_step is not None:
            on_step(StepInfo(step=stats.steps, loss=loss, output=out, cases=cases, logits=logits.detach(),
                             labels=labels, extra_loss=extra_value))
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
        stats.steps += 1
    return stats
