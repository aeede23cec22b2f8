"""Writing closed-form updates into weights, and undoing them exactly."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from overtone.models.adapters import ModelAdapter


def snapshot(weights: Sequence[nn.Parameter]) -> Callable[[], None]:
    """A function that restores ``weights`` bit for bit to their present values."""
    originals = [w.detach().clone() for w in weights]

    def revert() -> None:
        with torch.no_grad():
            for weight, original in zip(weights, originals, strict=True):
                weight.copy_(original)

    return revert


@torch.no_grad()
def add_update(adapter: ModelAdapter, weight: nn.Parameter, update: torch.Tensor) -> None:
    """``weight += update`` with ``update`` given as [out, in] (fp32 or fp64), in the weight's layout and dtype."""
    oriented = adapter.oriented(update)
    if oriented.shape != weight.shape:
        raise ValueError(f"update of shape {tuple(update.shape)} does not fit a weight of shape {tuple(weight.shape)}")
    weight.copy_((weight.double() + oriented.double()).to(weight.dtype))
