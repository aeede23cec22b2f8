"""What an edit reports: ``StepInfo`` at every forward pass of its optimisation, ``EditStats`` at its end.

Plain values, kept apart from the editor contract (``editors/base.py``) and from parallel editing
(``editors/parallel.py``) so that both can name them without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from overtone.benchmarks.cases import EditCase
from overtone.objectives import IGNORE_INDEX, ObjectiveOutput


@dataclass
class StepInfo:
    """What a gradient-based editor saw at one forward pass, before its update.

    Passed to the ``on_step`` callback of ``edit``; the model holds the weights of this step while
    the callback runs, so it may run extra (no-grad) forwards, e.g. to record probe losses. Row ``i``
    of ``logits``, ``labels`` and the per-token tensors of ``output`` belongs to ``cases[i]``.
    A parallel edit (``Editor.edit_parallel``) reports each case on its own, exactly what that case
    reports when edited alone; its weights are not in the model, so forwards that should see them run
    inside ``weights()``.
    ROME and MEMIT optimise a value vector, not weights: their weights change only after the last
    step, and their rows are one case's prompt variants, the bare prompt first (``editors/locate``).
    """

    step: int  # optimiser updates taken before this forward pass
    loss: float  # the objective's loss (without the editor's regularisers)
    output: ObjectiveOutput  # per-token losses and clipped / mixed / kept-set statistics
    cases: Sequence[EditCase]
    logits: torch.Tensor  # [B, T, V] the objective's input at the target positions, detached
    labels: torch.Tensor  # [B, T] target token ids, IGNORE_INDEX where padded
    extra_loss: float | None = None  # the editor's other terms at this pass (regularisers, margins)
    # parallel edits: a context in which forward passes see this case's weights of this step (valid
    # during the callback only); None: the model holds them
    weights: Callable[[], AbstractContextManager[Any]] | None = None

    def label_log_probs(self) -> torch.Tensor:
        """[B, T] log-likelihood of each target token under this step's weights (fp32; 0 where padded).

        Objectives report their own per-token loss (a KL for OverTone), so the running likelihood of
        the label itself, which the underfitting degree needs, is computed here from the logits.
        """
        mask = self.labels.ne(IGNORE_INDEX)
        log_probs = torch.log_softmax(self.logits.float(), dim=-1)
        picked = log_probs.gather(-1, self.labels.clamp_min(0)[..., None]).squeeze(-1)
        return picked.masked_fill(~mask, 0.0)


StepCallback = Callable[[StepInfo], None]


@dataclass
class EditStats:
    """What an edit's optimisation did.

    ``losses`` holds the objective's own loss only; an editor's further terms (AdaLoRA's orthogonality
    regulariser, ROME's KL and weight decay, WISE's activation margins) are kept apart in
    ``extra_losses``, so that a stop rule, a trace or a table never reads a regulariser as the loss.
    """

    steps: int = 0  # optimiser updates taken
    # the objective's loss at every forward pass: before each update, then after the last one (an edit that
    # ran its whole budget), or at the pass whose stop rule fired
    losses: list[float] = field(default_factory=list)
    extra_losses: list[float] = field(default_factory=list)  # the editor's other terms, per pass (empty: none)
    stopped_early: bool = False  # a stop rule ended the optimisation before its step budget
    stop_reason: str | None = None  # "loss", "clipped" or the editor's own rule ("settled"); None: ran its budget
    time_s: float = 0.0
    # token counts over the passes that led to an update (``ObjectiveOutput.activity``): how often the
    # objective's target differed from cross-entropy's, fell back to it, or was clipped
    activity: dict[str, int] = field(default_factory=dict)

    def count(self, output: ObjectiveOutput) -> None:
        """Add the token counts of the pass an update was made from."""
        self.add_activity(output.activity())

    def add_activity(self, counts: dict[str, int]) -> None:
        """Add token counts (another optimisation's, when one edit is made of several)."""
        for key, value in counts.items():
            self.activity[key] = self.activity.get(key, 0) + value

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
