"""Training objectives for gradient-based editors: cross-entropy and OverTone (with its ablations)."""

from __future__ import annotations

from overtone.objectives.base import IGNORE_INDEX, Objective, ObjectiveOutput
from overtone.objectives.ce import CrossEntropy
from overtone.objectives.overtone import OverTone, OverToneConfig, top_n_sigma_mask

OBJECTIVES = ("ce", "overtone")


def make_objective(name: str, overtone: OverToneConfig | None = None) -> Objective:
    """Build an objective by name; ``overtone`` configures OverTone and is ignored by CE."""
    if name == "ce":
        return CrossEntropy(reduction=overtone.reduction if overtone else "mean")
    if name == "overtone":
        return OverTone(overtone)
    raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")


__all__ = [
    "IGNORE_INDEX",
    "OBJECTIVES",
    "CrossEntropy",
    "Objective",
    "ObjectiveOutput",
    "OverTone",
    "OverToneConfig",
    "make_objective",
    "top_n_sigma_mask",
]
