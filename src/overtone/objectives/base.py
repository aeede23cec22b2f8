"""The contract every training objective of a gradient-based editor fulfils.

An objective scores the logits at the teacher-forced positions of the edit's target tokens. It
returns a per-token loss (so editors and diagnostics can look at single tokens, which is what
heterogeneous token overfitting is about) and the scalar the optimiser minimises, reduced the way
the host editors of the reference toolkit reduce cross-entropy: mean over the target tokens of each
edit, then mean over edits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

IGNORE_INDEX = -100
Reduction = Literal["mean", "sum"]


@dataclass
class ObjectiveOutput:
    """Loss and per-token statistics of one objective evaluation.

    All per-token tensors have the shape of ``labels``; ignored positions hold 0 / False.
    """

    loss: torch.Tensor  # scalar that the optimiser minimises
    token_loss: torch.Tensor  # [B, T] per-token loss (clipped value for OverTone), detached
    clipped: torch.Tensor  # [B, T] bool: the token sent no gradient (KL below epsilon)
    mixed: torch.Tensor  # [B, T] bool: the target was the smoothed mixture, not the one-hot label
    kept: torch.Tensor  # [B, T] int: size of the top-n-sigma kept set (0 where unused)
    mask: torch.Tensor  # [B, T] bool: positions that were scored
    example_loss: torch.Tensor | None = None  # [B] each row's reduced loss, with its graph (0 for a row without tokens)

    @property
    def active_tokens(self) -> int:
        """Number of scored tokens that still send gradient."""
        return int((self.mask & ~self.clipped).sum())

    def group_loss(self, rows: slice) -> torch.Tensor:
        """The loss of the edit whose rows are ``rows``, reduced as ``loss`` reduces the whole batch.

        Parallel editing scores many independent edits in one batch: each one's loss is the mean over
        its own rows, so the value is what the same objective gives that edit alone.
        """
        assert self.example_loss is not None
        scored = self.mask[rows].any(dim=-1)
        return self.example_loss[rows][scored].mean()

    def select(self, rows: slice, loss: torch.Tensor) -> ObjectiveOutput:
        """The output restricted to ``rows``, with ``loss`` as its loss (one edit of a parallel batch)."""
        return ObjectiveOutput(loss=loss, token_loss=self.token_loss[rows], clipped=self.clipped[rows],
                               mixed=self.mixed[rows], kept=self.kept[rows], mask=self.mask[rows],
                               example_loss=None if self.example_loss is None else self.example_loss[rows])


class Objective(ABC):
    """A loss over target-token logits; ``needs_reference`` objectives also take the unedited logits."""

    name: ClassVar[str]
    needs_reference: bool = False

    def __init__(self, reduction: Reduction = "mean") -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    @abstractmethod
    def token_losses(
        self, logits: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token losses of the N scored tokens.

        ``logits`` is [N, V] (fp32), ``labels`` [N], ``reference`` [N, V] or None. Returns
        (loss [N] with grad, clipped [N] bool, mixed [N] bool, kept [N] int).
        """

    def config(self) -> dict[str, object]:
        """The objective's settings, as written into a run's resolved configuration."""
        return {"name": self.name, "reduction": self.reduction}

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        reference: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        """Score ``logits`` [B, T, V] against ``labels`` [B, T]; labels equal to -100 are ignored."""
        if logits.shape[:-1] != labels.shape:
            raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
        if self.needs_reference:
            if reference is None:
                raise ValueError(f"objective {self.name!r} needs the unedited model's logits (reference)")
            if reference.shape != logits.shape:
                raise ValueError(f"reference {tuple(reference.shape)} does not match logits {tuple(logits.shape)}")
        mask = labels.ne(IGNORE_INDEX)
        if not bool(mask.any()):
            raise ValueError("no target tokens to score: every label is ignored")
        ref = reference[mask].float() if self.needs_reference and reference is not None else None
        loss_n, clipped_n, mixed_n, kept_n = self.token_losses(logits[mask].float(), labels[mask], ref)

        token_loss = torch.zeros(labels.shape, dtype=loss_n.dtype, device=labels.device)
        token_loss = token_loss.masked_scatter(mask, loss_n)  # keeps the graph for the reduction
        per_example = token_loss.sum(dim=-1)
        if self.reduction == "mean":
            per_example = per_example / mask.sum(dim=-1).clamp_min(1)
        rows = mask.any(dim=-1)
        loss = per_example[rows].mean()

        def scatter(values: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(labels.shape, dtype=values.dtype, device=labels.device)
            return out.masked_scatter(mask, values)

        return ObjectiveOutput(
            loss=loss,
            token_loss=token_loss.detach(),
            clipped=scatter(clipped_n),
            mixed=scatter(mixed_n),
            kept=scatter(kept_n),
            mask=mask,
            example_loss=per_example,
        )
