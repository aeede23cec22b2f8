"""The state a lifelong editor carries from batch to batch (AlphaEdit, UltraEdit), kept with the model's edits.

AlphaEdit sums the key outer products of every earlier batch (``cache_c``) and UltraEdit keeps running
feature statistics; a batch's update depends on them. That state describes the edits the model
carries, so it lives beside them, on the model object (per editor and edited weights), not inside one
editor object:

* an edit snapshots the weights it changes and the state; its handle's ``revert`` puts both back, so
  a reverted edit leaves nothing behind and two runs on the same model never share state unless
  the first one's edits are still in the weights (the reference toolkit kept AlphaEdit's ``cache_c``
  across runs whose weights it had restored: its issue #613);
* a new editor on a model that carries live edits of this kind, e.g. applied from an artifact,
  continues their stream; on an unedited model it starts from zero; ``reset`` zeroes the state;
* a saved edit holds the change of every edited matrix since before the stream's first live edit, at
  twice its precision (so adding it back gives the weights bit for bit, whatever the stream's
  length), and the state tensors as they are.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from overtone.editors.base import EditError, EditHandle, EditStats, SavedEdit, UpdateLog
from overtone.editors.locate.update import add_change, changes_since, snapshot
from overtone.models.loading import LoadedModel

StateFactory = Callable[[], dict[str, torch.Tensor]]


class Stream:
    """One editor's stream on one model: its state tensors (changed in place only) and the base of its live edits."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state
        self.log = UpdateLog()  # the weights' values before the first live edit, one record per live edit

    def reset(self) -> None:
        """Zero the state; the weights and the handles of live edits are left as they are."""
        with torch.no_grad():
            for tensor in self.state.values():
                tensor.zero_()

    def edit(self, weights: Mapping[str, nn.Parameter], first_layer: int,
             change: Callable[[], EditStats]) -> EditHandle:
        """Run ``change`` (which updates ``weights`` and the state in place); on any error, undo it and re-raise.

        The handle restores the weights and the state to their values before ``change``.
        """
        tensors = [*weights.values(), *self.state.values()]
        restore = snapshot(tensors)
        mark = self.log.begin(weights)

        def revert() -> None:
            restore()
            self.log.revert_to(mark)

        try:
            stats = change()
        except BaseException:
            revert()
            raise
        return EditHandle(revert, first_layer=first_layer, stats=stats, restores=tuple(tensors))

    def saved(self, lm: LoadedModel) -> SavedEdit:
        """The live edits: ``delta.<weight>`` since the stream's base (widened) and ``state.<name>``."""
        if not self.log.edits:
            return SavedEdit(tensors={})
        tensors = {f"delta.{name}": change for name, change in changes_since(lm.adapter, self.log.base).items()}
        tensors.update({f"state.{name}": tensor for name, tensor in self.state.items()})
        return SavedEdit(tensors=tensors, state={"weights": list(self.log.base)}, base=dict(self.log.base))

    def apply(self, lm: LoadedModel, saved: SavedEdit, first_layer: int) -> EditHandle:
        """Add the saved weight changes and take over the saved state: the stream continues from there."""
        weights = {name: lm.adapter.parameter(name) for name in saved.state["weights"]}
        expected = {f"state.{name}": tensor.shape for name, tensor in self.state.items()}
        found = {name: tensor.shape for name, tensor in saved.tensors.items() if name.startswith("state.")}
        if found != expected:
            wrong = sorted(set(found.items()) ^ set(expected.items()))
            raise EditError(f"the saved stream state does not fit this editor's: {wrong[0][0]} "
                            f"{list(found.get(wrong[0][0], ()))} where {list(expected.get(wrong[0][0], ()))} is "
                            "expected (another editor's or model's stream)")

        def change() -> EditStats:
            with torch.no_grad():
                for name, weight in weights.items():
                    add_change(weight, saved.tensors[f"delta.{name}"])
                for name, tensor in self.state.items():
                    tensor.copy_(saved.tensors[f"state.{name}"])
            return EditStats()

        return self.edit(weights, first_layer, change)


# model -> (editor, edited weights) -> its stream
_STREAMS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, tuple[str, ...]], Stream]] = \
    weakref.WeakKeyDictionary()


def model_stream(lm: LoadedModel, editor: str, weights: Sequence[str], zeros: StateFactory) -> Stream:
    """The stream of ``editor`` editing ``weights`` of this model, made with the state ``zeros()`` the first time."""
    per_model = _STREAMS.setdefault(lm.model, {})
    key = (editor, tuple(weights))
    if key not in per_model:
        per_model[key] = Stream(zeros())
    return per_model[key]

