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
from typing import ClassVar, Literal, NamedTuple

import torch

IGNORE_INDEX = -100
Reduction = Literal["mean", "sum"]
# Why a token's target fell back to the one-hot label (``ObjectiveOutput.fallback``).
FALLBACK_NONE, FALLBACK_NOT_MODE, FALLBACK_TIE = 0, 1, 2


class TokenScores(NamedTuple):
    """What ``Objective.token_losses`` returns for the N scored tokens."""

    loss: torch.Tensor  # [N] with grad
    clipped: torch.Tensor  # [N] bool: no gradient (token-level early stop)
    mixed: torch.Tensor  # [N] bool: the target differs from the one-hot label
    kept: torch.Tensor  # [N] int: size of the top-n-sigma kept set (0 where unused)
    fallback: torch.Tensor | None = None  # [N] FALLBACK_*: why the mode check chose the one-hot (None: never)


@dataclass
class ObjectiveOutput:
    """Loss and per-token statistics of one objective evaluation.

    All per-token tensors have the shape of ``labels``; ignored positions hold 0 / False.
    """

    loss: torch.Tensor  # scalar that the optimiser minimises
    token_loss: torch.Tensor  # [B, T] per-token loss (clipped value for OverTone), detached
    clipped: torch.Tensor  # [B, T] bool: the token sent no gradient (KL below epsilon)
    mixed: torch.Tensor  # [B, T] bool: the target differed from the one-hot label (the smoothed mixture)
    kept: torch.Tensor  # [B, T] int: size of the top-n-sigma kept set (0 where unused)
    mask: torch.Tensor  # [B, T] bool: positions that were scored
    # [B] each row's reduced loss, with its graph (the floor for a row without tokens)
    example_loss: torch.Tensor | None = None
    fallback: torch.Tensor | None = None  # [B, T] FALLBACK_*: why the target fell back to the one-hot
    floor: float = 0.0  # the objective's floor (``Objective.floor``), added back after every mean

    def activity(self) -> dict[str, int]:
        """Counts over the scored tokens of this pass: ``tokens``, ``mixed`` (target differs from the one-hot),
        ``fallback_mode`` / ``fallback_tie`` (the mode check chose the one-hot: the label was not the mode of
        the mixture / tied with another token) and ``clipped`` (no gradient). What makes OverTone differ
        from cross-entropy at all; summed over an edit's passes into its record."""
        scored = self.mask
        counts = {"tokens": int(scored.sum()), "mixed": int((self.mixed & scored).sum()),
                  "clipped": int((self.clipped & scored).sum()), "fallback_mode": 0, "fallback_tie": 0}
        if self.fallback is not None:
            counts["fallback_mode"] = int(((self.fallback == FALLBACK_NOT_MODE) & scored).sum())
            counts["fallback_tie"] = int(((self.fallback == FALLBACK_TIE) & scored).sum())
        return counts

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
        return (self.example_loss[rows][scored] - self.floor).mean() + self.floor

    def select(self, rows: slice, loss: torch.Tensor) -> ObjectiveOutput:
        """The output restricted to ``rows``, with ``loss`` as its loss (one edit of a parallel batch)."""
        return ObjectiveOutput(loss=loss, token_loss=self.token_loss[rows], clipped=self.clipped[rows],
                               mixed=self.mixed[rows], kept=self.kept[rows], mask=self.mask[rows],
                               example_loss=None if self.example_loss is None else self.example_loss[rows],
                               fallback=None if self.fallback is None else self.fallback[rows], floor=self.floor)


class Objective(ABC):
    """A loss over target-token logits; ``needs_reference`` objectives also take the unedited logits.

    ``floor`` is the value a clipped token's loss holds (OverTone's ε; 0 for CE). The reduction averages
    each token's excess over the floor and adds the floor back, so an edit whose every token is clipped
    has a loss of exactly ``floor`` in float32, whatever its length: a plain mean of T copies of float32(ε)
    rounds above or below it depending on T, which made a loss-threshold stop fire for some target
    lengths and not for others.
    """

    name: ClassVar[str]
    needs_reference: bool = False
    floor: float = 0.0

    def __init__(self, reduction: Reduction = "mean") -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    @abstractmethod
    def token_losses(
        self, logits: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None
    ) -> TokenScores | tuple[torch.Tensor, ...]:
        """Per-token losses of the N scored tokens.

        ``logits`` is [N, V] (fp32), ``labels`` [N], ``reference`` [N, V] or None. Returns ``TokenScores``
        (or the same fields as a tuple: loss [N] with grad, clipped [N] bool, mixed [N] bool, kept [N] int).
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
        scores = TokenScores(*self.token_losses(logits[mask].float(), labels[mask], ref))

        token_loss = torch.zeros(labels.shape, dtype=scores.loss.dtype, device=labels.device)
        token_loss = token_loss.masked_scatter(mask, scores.loss)  # keeps the graph for the reduction
        counts = mask.sum(dim=-1)
        # the excess over the floor is averaged, the floor added back exactly (see the class docstring)
        excess = (token_loss - self.floor * mask).sum(dim=-1)
        if self.reduction == "mean":
            excess = excess / counts.clamp_min(1)
            per_example = excess + self.floor
        else:
            per_example = excess + self.floor * counts
        rows = mask.any(dim=-1)
        loss = excess[rows].mean() + self.floor if self.reduction == "mean" else per_example[rows].mean()

        def scatter(values: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(labels.shape, dtype=values.dtype, device=labels.device)
            return out.masked_scatter(mask, values)

        return ObjectiveOutput(
            loss=loss,
            token_loss=token_loss.detach(),
            clipped=scatter(scores.clipped),
            mixed=scatter(scores.mixed),
            kept=scatter(scores.kept),
            mask=mask,
            example_loss=per_example,
            fallback=None if scores.fallback is None else scatter(scores.fallback),
            floor=self.floor if self.reduction == "mean" else 0.0,
        )
