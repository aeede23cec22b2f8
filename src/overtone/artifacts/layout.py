"""What each editor's saved tensors and state must look like, checked against the manifest before any model
is loaded: every tensor an edit writes into or builds on is a parameter whose original values the manifest
records (``model.tensors``), and every shape fits that parameter exactly (nothing is broadcast).

The layouts are those of ``Editor.saved_edit`` (see each editor's file); the tests save every editor's
edits and read them back through these checks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from overtone.artifacts.manifest import (
    FLAG,
    MANIFEST,
    NUMBER,
    TEXT,
    WHOLE,
    Record,
    check_fields,
    listed,
    optional,
    refuse,
)

Shapes = dict[str, list[int]]  # parameter name -> recorded shape (the manifest's model.tensors)


def _fits(shape: list[int], out_in: tuple[int, int]) -> bool:
    """Whether a weight of ``shape`` takes an update [out, in]: in either layout (GPT-2's Conv1D stores [in, out])."""
    return list(out_in) in (shape, shape[::-1])


class _Layout:
    """The checks of one artifact: ``bad`` refuses naming the tensor file and the tensor (or manifest field)."""

    def __init__(self, folder: Path, file: str, state: dict[str, Any], tensors: dict[str, torch.Tensor],
                 base: Shapes) -> None:
        self.folder, self.file, self.state, self.tensors, self.base = folder, file, state, tensors, base

    def bad(self, name: str, problem: str, file: str | None = None) -> Exception:
        return refuse(self.folder, file or self.file, name, problem)

    def state_fields(self, check: Record) -> None:
        check_fields(self.folder, self.state, check, "edit.state")

    def base_name(self, name: str, field: str, file: str | None = None) -> list[int]:
        """The recorded shape of parameter ``name``, which ``field`` refers to; refused if it is not recorded."""
        if name not in self.base:
            raise self.bad(field, f"refers to {name!r}, which is not among the parameters whose original values the "
                                  "manifest records (model.tensors)", file)
        return self.base[name]

    def exactly(self, names: set[str]) -> None:
        """The tensor file holds exactly ``names``."""
        missing, extra = sorted(names - self.tensors.keys()), sorted(self.tensors.keys() - names)
        if missing:
            raise self.bad(missing[0], "missing from the file (the edit's state lists it)")
        if extra:
            raise self.bad(extra[0], "not part of this edit (its state does not list it)")

    def dims(self, name: str, count: int) -> torch.Tensor:
        tensor = self.tensors[name]
        if tensor.dim() != count or not tensor.is_floating_point():
            raise self.bad(name, f"expected a floating-point tensor of {count} dimension(s), found {tensor.dtype} "
                                 f"{list(tensor.shape)}")
        return tensor


def _ft_m(layout: _Layout) -> None:
    """One change per edited weight, named as the weight, of its exact shape."""
    for name, delta in layout.tensors.items():
        shape = layout.base_name(name, name)
        if list(delta.shape) != shape:
            raise layout.bad(name, f"shape {list(delta.shape)} differs from the weight's {shape} (a change is added "
                                   "element by element, never broadcast)")


def _low_rank(layout: _Layout) -> None:
    """ROME, MEMIT: update i writes ``left @ right`` ([out] x [in], or [out, n] x [n, in]) into ``updates[i]``;
    or, for edits whose updates outgrew the weights (``UpdateLog``), each weight's change as ``_changes``."""
    if "weights" in layout.state:
        _changes(layout)
        return
    layout.state_fields(Record({"updates": listed(TEXT)}, closed=False))
    updates = layout.state["updates"]
    layout.exactly({f"update.{i}.{side}" for i in range(len(updates)) for side in ("left", "right")})
    for i, name in enumerate(updates):
        shape = layout.base_name(name, f"edit.state.updates[{i}]", MANIFEST)
        left = layout.tensors[f"update.{i}.left"]
        rank = left.dim()
        if rank not in (1, 2):
            raise layout.bad(f"update.{i}.left", f"expected 1 or 2 dimensions, found {list(left.shape)}")
        left, right = layout.dims(f"update.{i}.left", rank), layout.dims(f"update.{i}.right", rank)
        inner_ok = rank == 1 or left.shape[1] == right.shape[0]
        if not inner_ok or not _fits(shape, (left.shape[0], right.shape[-1])):
            raise layout.bad(f"update.{i}.right", f"factors {list(left.shape)} and {list(right.shape)} do not make "
                                                  f"an update of {name} {shape}")


def _wise(layout: _Layout) -> None:
    """Side memories: copies of the one recorded weight (and the open shard's mask), one per shard."""
    shard = Record({"min_act": optional(NUMBER), "edits": WHOLE, "closed": FLAG})
    layout.state_fields(Record({"shards": listed(shard), "opened": WHOLE, "unmerged": WHOLE}))
    if len(layout.base) != 1:
        raise layout.bad("model.tensors", f"a WISE edit builds on one weight; the manifest records {len(layout.base)}",
                         MANIFEST)
    (shape,) = layout.base.values()
    count = len(layout.state["shards"])
    masks = {f"shard.{i}.mask" for i in range(count)} & layout.tensors.keys()
    layout.exactly({f"shard.{i}.weight" for i in range(count)} | masks)
    for name, tensor in layout.tensors.items():
        if list(tensor.shape) != shape:
            raise layout.bad(name, f"shape {list(tensor.shape)} differs from the weight's {shape}")
        if name.endswith(".mask") and tensor.dtype != torch.bool:
            raise layout.bad(name, f"a gradient mask is boolean, found {tensor.dtype}")


def _melo(layout: _Layout) -> None:
    """A LoRA block per edit and recorded weight, and a codebook of clusters (a centre [H], keys [P, H])."""
    cluster = Record({"radius": NUMBER, "label": TEXT, "blocks": listed(optional(TEXT))})
    layout.state_fields(Record({"adapters": listed(TEXT), "clusters": listed(cluster), "created": WHOLE}))
    adapters, clusters = layout.state["adapters"], layout.state["clusters"]
    names = {f"cluster.{j}.{part}" for j in range(len(clusters)) for part in ("center", "keys")}
    names |= {f"block.{a}.{weight.removesuffix('.weight')}.lora_{s}" for a in adapters for weight in layout.base
              for s in "AB"}
    layout.exactly(names)
    for a in adapters:
        for weight, shape in layout.base.items():
            block = f"block.{a}.{weight.removesuffix('.weight')}"
            down, up = layout.dims(f"{block}.lora_A", 2), layout.dims(f"{block}.lora_B", 2)
            if down.shape[0] != up.shape[1] or not _fits(shape, (up.shape[0], down.shape[1])):
                raise layout.bad(f"{block}.lora_B", f"blocks {list(down.shape)} and {list(up.shape)} do not fit "
                                                    f"{weight} {shape}")
    for j, info in enumerate(clusters):
        center, keys = layout.dims(f"cluster.{j}.center", 1), layout.dims(f"cluster.{j}.keys", 2)
        if keys.shape[1] != center.shape[0]:
            raise layout.bad(f"cluster.{j}.keys", f"keys {list(keys.shape)} do not match the centre "
                                                   f"{list(center.shape)}")
        unknown = [b for b in info["blocks"] if b is not None and b not in adapters]
        if unknown or len(info["blocks"]) != keys.shape[0]:
            raise layout.bad(f"edit.state.clusters[{j}].blocks", f"expected one adapter of {adapters} (or null) per "
                                                                  f"key ({keys.shape[0]})", MANIFEST)


_PEFT_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[ABE])(\.weight)?")


def _lora(layout: _Layout) -> None:
    """A peft adapter state dict: factors A [r, in], B [out, r] (AdaLoRA also E [r, 1]) of recorded weights."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in layout.tensors.items():
        match = _PEFT_KEY.fullmatch(name)
        if match is None:
            raise layout.bad(name, "not a LoRA factor of a model weight")
        layout.base_name(f"{match['module']}.weight", name)
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    for module, factors in parts.items():
        if "A" not in factors or "B" not in factors:
            raise layout.bad(f"base_model.model.{module}", "needs both LoRA factors A and B")
        down, up = factors["A"], factors["B"]
        shape = layout.base[f"{module}.weight"]
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1] or \
                not _fits(shape, (up.shape[0], down.shape[1])):
            raise layout.bad(f"base_model.model.{module}.lora_B", f"factors {list(down.shape)} and {list(up.shape)} "
                                                                  f"do not fit {module}.weight {shape}")


def _stream(layout: _Layout) -> None:
    """AlphaEdit, UltraEdit (``editors/stream.py``): the changes of ``_changes``, and the stream's state as
    ``state.<name>`` (its shapes are checked against the editor's own when applied)."""
    _changes(layout, {name for name in layout.tensors if name.startswith("state.")})


def _changes(layout: _Layout, state: frozenset[str] | set[str] = frozenset()) -> None:
    """``delta.<weight>`` of each weight the state lists, of its exact shape (and the ``state`` tensors)."""
    layout.state_fields(Record({"weights": listed(TEXT)}, closed=False))
    weights = layout.state["weights"]
    layout.exactly({f"delta.{name}" for name in weights} | set(state))
    for i, name in enumerate(weights):
        shape = layout.base_name(name, f"edit.state.weights[{i}]", MANIFEST)
        delta = layout.dims(f"delta.{name}", len(shape))
        if list(delta.shape) != shape:
            raise layout.bad(f"delta.{name}", f"shape {list(delta.shape)} differs from the weight's {shape} (a change "
                                              "is added element by element, never broadcast)")


LAYOUTS: dict[str, Callable[[_Layout], None]] = {
    "ft-m": _ft_m, "rome": _low_rank, "memit": _low_rank, "wise": _wise, "melo": _melo, "lora": _lora,
    "alphaedit": _stream, "ultraedit": _stream,
}


def check_layout(folder: Path, file: str, editor: str, state: dict[str, Any], tensors: dict[str, torch.Tensor],
                 base: Shapes) -> None:
    """Refuse an edit whose tensors or state do not fit what ``editor`` saves, naming the tensor or field."""
    if editor not in LAYOUTS:
        raise refuse(folder, MANIFEST, "editor.name", f"{editor!r} saves no edits this overtone can check")
    LAYOUTS[editor](_Layout(folder, file, state, tensors, base))
