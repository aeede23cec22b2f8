"""The optimisation loop shared by every gradient-based editor.

An editor supplies what differs (which parameters, which extra loss terms, what happens after an
update); the loop does what is the same everywhere: score the target tokens with the objective, fail
cleanly on a non-finite loss, report each step, stop early, count steps.

Early stop (the reference toolkit's FT-M rule, extended to OverTone): the step is skipped and training
stops when the loss falls below ``stop_loss``, or when every target token is clipped by the objective
(no token sends gradient any more; an Adam step would still move the weights through its momentum).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import EditError, EditStats, StepCallback, StepInfo
from overtone.models.adapters import ModelAdapter
from overtone.models.replay import SuffixCache, forward_hidden, forward_suffix
from overtone.objectives import Objective, ObjectiveOutput
from overtone.tokens import PairBatch


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
    below). The vocabulary head runs only at the target positions. The first call's logits are the
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
        logits = self.adapter.logits(self.batch.gather(hidden))
        if self.reference is None:
            self.reference = logits.detach()
        return logits


def optimise(
    cases: Sequence[EditCase],
    objective: Objective,
    target_logits: LogitSource,
    update: Callable[[torch.Tensor], None],
    steps: int,
    stop_loss: float,
    on_step: StepCallback | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    stop: Callable[[float, ObjectiveOutput], bool] | None = None,
) -> EditStats:
    """Run up to ``steps`` updates; ``update(loss)`` back-propagates and applies one step.

    ``extra_loss`` adds editor-specific terms (regularisers) to the objective's loss. ``stop(loss,
    output)``, when given, replaces the early-stop rule above (an editor with its own, e.g. WISE).
    """
    stats = EditStats()
    labels = target_logits.labels
    for _ in range(steps):
        logits = target_logits()
        out: ObjectiveOutput = objective(logits, labels, target_logits.reference)
        total = out.loss if extra_loss is None else out.loss + extra_loss()
        loss = total.item()
        if not math.isfinite(loss):
            raise EditError(
                f"case {', '.join(c.case_id for c in cases)}: the {objective.name} loss is {loss} "
                f"at step {stats.steps}; the weights were restored"
            )
        stats.losses.append(loss)
        if on_step is not None:
            on_step(StepInfo(step=stats.steps, loss=loss, output=out, cases=cases, logits=logits.detach(),
                             labels=labels))
        if stop(loss, out) if stop is not None else (loss < stop_loss or out.active_tokens == 0):
            stats.stopped_early = True
            break
        update(total)
        stats.steps += 1
    return stats
