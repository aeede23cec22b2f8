"""Writing closed-form updates into weights, and undoing them exactly."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from overtone.editors import parallel
from overtone.editors.base import EditHandle, EditStats, SavedEdit, UpdateLog
from overtone.models.adapters import ModelAdapter
from overtone.models.loading import LoadedModel


def snapshot(weights: Sequence[nn.Parameter]) -> Callable[[], None]:
    """A function that restores ``weights`` bit for bit to their present values."""
    originals = [w.detach().clone() for w in weights]

    def revert() -> None:
        with torch.no_grad():
            for weight, original in zip(weights, originals, strict=True):
                weight.copy_(original)

    return revert


def _add_by_rows(weight: nn.Parameter, change: torch.Tensor, dtype: torch.dtype) -> None:
    """``weight += change``, summed in ``dtype``, a block of rows at a time: the sum is elementwise, so the bits are
    those of the whole matrix at once, without its two widened copies (1 GiB for one 7B MLP matrix in fp64)."""
    rows = max(1, parallel.WRITE_CHUNK_VALUES // max(1, weight[0].numel()))
    for part, delta in zip(weight.detach().split(rows), change.split(rows), strict=True):
        part.copy_((part.to(dtype) + delta.to(dtype)).to(part.dtype))


@torch.no_grad()
def add_update(adapter: ModelAdapter, weight: nn.Parameter, update: torch.Tensor) -> None:
    """``weight += update`` with ``update`` given as [out, in] (fp32 or fp64), in the weight's layout and dtype."""
    oriented = adapter.oriented(update)
    if oriented.shape != weight.shape:
        raise ValueError(f"update of shape {tuple(update.shape)} does not fit a weight of shape {tuple(weight.shape)}")
    _add_by_rows(weight, oriented, torch.float64)


def factor_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """A low-rank update [out, in] from its factors: ``outer(left, right)`` for vectors (ROME's rank one),
    ``left @ right`` for [out, r] and [r, in] (MEMIT). Editing and re-applying both compute it here."""
    return torch.outer(left, right) if left.dim() == 1 else left @ right


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """A precision in which the difference of two values of ``dtype`` is exact (fp32 -> fp64, else fp32)."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def wide(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` at ``wide_dtype``: the difference of two of its values is exact."""
    return weight.detach().to(wide_dtype(weight.dtype))


def changes_since(adapter: ModelAdapter, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each weight's change since its ``base`` value, widened, so that ``add_change`` gives it back bit for bit."""
    return {name: wide(adapter.parameter(name)) - wide(value) for name, value in base.items()}


@torch.no_grad()
def add_change(weight: nn.Parameter, change: torch.Tensor) -> None:
    """``weight += change`` for a change made by ``changes_since``: the weight it was taken from, exactly."""
    _add_by_rows(weight, change.to(weight.device), torch.promote_types(wide_dtype(weight.dtype), change.dtype))


def saved_factors(lm: LoadedModel, log: UpdateLog) -> SavedEdit:
    """The live edits of ``log``: its low-rank updates in order (factors ``update.<i>.left/right`` and the
    weight each changed), or, once the log dropped them (a long stream), each weight's change since the base
    (``delta.<weight>``, widened, as the stream editors save theirs: ``editors/stream.py``)."""
    if not log.edits:
        return SavedEdit(tensors={}, state={"updates": []})
    if not log.complete:
        tensors = {f"delta.{name}": change for name, change in changes_since(lm.adapter, log.base).items()}
        return SavedEdit(tensors=tensors, state={"weights": list(log.base)}, base=log.base)
    tensors: dict[str, torch.Tensor] = {}
    for i, (_name, left, right) in enumerate(log.updates):
        tensors[f"update.{i}.left"], tensors[f"update.{i}.right"] = left, right
    state = {"updates": [name for name, _, _ in log.updates]}
    return SavedEdit(tensors=tensors, state=state, base=log.base)


def apply_factors(lm: LoadedModel, saved: SavedEdit, first_layer: int) -> EditHandle:
    """Add the saved updates to their weights in their order (the same arithmetic as the edits that made them),
    or the saved changes since the base."""
    names = saved.state.get("weights") or saved.state["updates"]
    weights = {name: lm.adapter.parameter(name) for name in dict.fromkeys(names)}
    revert = snapshot(list(weights.values()))
    try:
        if "weights" in saved.state:
            for name, weight in weights.items():
                add_change(weight, saved.tensors[f"delta.{name}"])
        for i, name in enumerate(saved.state.get("updates", ())):
            weight = weights[name]
            left, right = (saved.tensors[f"update.{i}.{side}"].to(weight.device) for side in ("left", "right"))
            add_update(lm.adapter, weight, factor_product(left, right))
    except BaseException:
        revert()
        raise
    return EditHandle(revert, first_layer=first_layer, stats=EditStats(), restores=tuple(weights.values()))
