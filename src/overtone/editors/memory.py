"""What the memory-based editors (WISE, MELO) share: presets, an undo journal, seeds.

Both keep their edits outside the model's weights (a side copy of a matrix, LoRA blocks) and route
each sequence to one of them at inference. Their state therefore lives in the editor: an edit's
handle holds a snapshot of that state from before the edit, and reverting the edit restores it.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, replace
from typing import Any, Generic, TypeVar

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import EditHandle, EditStats
from overtone.models.loading import LoadedModel

log = logging.getLogger(__name__)

C = TypeVar("C")
S = TypeVar("S")


# The models the presets were made for, by architecture and size (``config.json`` fields), so that a hub id
# or a local folder gets the preset of its shape, whatever it is called; fine-tunes of a base model
# (chat / instruct variants) share its shape and its preset.
PRESET_SHAPES: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                       vocab_size=32000),
    "llama-3-8b": dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                       vocab_size=128256),
    "smollm2-135m": dict(model_type="llama", num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                         vocab_size=49152),
}


def shape_of(lm: LoadedModel) -> dict[str, Any]:
    """The fields of the model's config that name its architecture and size."""
    config = lm.model.config
    return {key: getattr(config, key, None) for key in next(iter(PRESET_SHAPES.values()))}


def matching_preset(lm: LoadedModel, presets: Mapping[str, Any]) -> str | None:
    """The preset whose model has the loaded model's architecture and size, if any."""
    shape = shape_of(lm)
    return next((name for name in presets if PRESET_SHAPES.get(name) == shape), None)


def resolve_preset(config: C, presets: Mapping[str, Mapping[str, Any]], lm: LoadedModel, editor: str,
                   required: Sequence[str] = (), hint: str = "") -> C:
    """Fill the unset (None) fields of ``config`` from a preset.

    The preset is ``config.preset`` if given, else the one made for a model of the loaded model's
    architecture and size (``PRESET_SHAPES``), else none. Fields set explicitly always win. A field of
    ``required`` that is still unset is an error naming ``--set preset=`` and the fields: a preset is
    never borrowed from a model of another size without the user saying so.
    """
    name = getattr(config, "preset", None)
    if name is None:
        name = matching_preset(lm, presets)
    elif name not in presets:
        raise ValueError(f"{editor}: unknown preset {name!r}; available: {', '.join(sorted(presets))}")
    if name is not None:
        known = {f.name for f in fields(config)}  # type: ignore[arg-type]
        values = {k: v for k, v in presets[name].items() if k in known and getattr(config, k) is None}
        config = replace(config, preset=name, **values)  # type: ignore[type-var]
    missing_settings(config, required, editor, lm,
                     f"Presets: {', '.join(sorted(presets))}, made for models of these shapes: " + "; ".join(
                         f"{n} = {PRESET_SHAPES[n]['model_type']}, {PRESET_SHAPES[n]['num_hidden_layers']} layers, "
                         f"hidden {PRESET_SHAPES[n]['hidden_size']}" for n in sorted(presets) if n in PRESET_SHAPES)
                     + f"; this model: {shape_of(lm)}. {hint}".rstrip())
    return config


def missing_settings(config: Any, names: Sequence[str], editor: str, lm: LoadedModel, hint: str) -> None:
    """Raise a clear error naming every required setting that neither the user nor a preset gave."""
    missing = [n for n in names if getattr(config, n) is None]
    if missing:
        raise ValueError(
            f"{editor} has no preset for model {lm.name!r}; choose one with --set preset=NAME or set "
            f"{', '.join(missing)} (e.g. --set {missing[0]}=...). {hint}"
        )


def edit_seed(seed: int, cases: Sequence[EditCase]) -> int:
    """A seed that depends only on the edited cases, so a resumed or reordered run draws the same numbers."""
    key = "\x1f".join(c.case_id for c in cases)
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


class Journal(Generic[S]):
    """The live edits of an editor whose state lives outside the model's weights, oldest first.

    Each edit's handle holds the snapshot of the state from before it; reverting the edit restores
    that snapshot, which also undoes every later edit, whose handles then do nothing (like restoring
    an earlier weight copy would). The handles declare the journal as what they restore, so in a
    sequence of edits ``EditStack`` keeps only the first one and the later snapshots are freed.
    """

    def __init__(self) -> None:
        self._live: list[int] = []
        self._next = 0

    def __len__(self) -> int:
        return len(self._live)

    def handle(self, snapshot: S, restore: Callable[[S], None], first_layer: int, stats: EditStats) -> EditHandle:
        """The handle of a new edit, given the state before it and how to put a state back."""
        self._next += 1
        serial = self._next
        self._live.append(serial)

        def revert() -> None:
            if serial in self._live:
                restore(snapshot)
                del self._live[self._live.index(serial):]

        return EditHandle(revert, first_layer=first_layer, stats=stats, restores=(self,))
