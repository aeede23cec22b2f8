"""What the memory-based editors (WISE, MELO) share: presets, an undo journal, seeds.

Both keep their edits outside the model's weights (a side copy of a matrix, LoRA blocks) and route
each sequence to one of them at inference. Their state therefore lives in the editor: an edit pushes
a snapshot of that state onto a journal, and reverting the edit restores it.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, replace
from typing import Any, Generic, TypeVar

from overtone.benchmarks.cases import EditCase
from overtone.models.loading import LoadedModel

log = logging.getLogger(__name__)

C = TypeVar("C")
S = TypeVar("S")


def resolve_preset(config: C, presets: Mapping[str, Mapping[str, Any]], lm: LoadedModel, editor: str) -> C:
    """Fill the unset (None) fields of ``config`` from a preset.

    The preset is ``config.preset`` if given, else the one named like the loaded model (the embedded
    model has its own), else none. Fields set explicitly always win.
    """
    name = getattr(config, "preset", None)
    if name is None and lm.name in presets:
        name = lm.name
    if name is None:
        return config
    if name not in presets:
        raise ValueError(f"{editor}: unknown preset {name!r}; available: {', '.join(sorted(presets))}")
    known = {f.name for f in fields(config)}  # type: ignore[arg-type]
    values = {k: v for k, v in presets[name].items() if k in known and getattr(config, k) is None}
    return replace(config, preset=name, **values)  # type: ignore[type-var]


def missing_settings(config: Any, names: Sequence[str], editor: str, lm: LoadedModel, hint: str) -> None:
    """Raise a clear error naming every required setting that neither the user nor a preset gave."""
    missing = [n for n in names if getattr(config, n) is None]
    if missing:
        raise ValueError(
            f"{editor} has no preset for model {lm.name!r}; set {', '.join(missing)} "
            f"(e.g. --set {missing[0]}=...) or choose a preset with --set preset=NAME. {hint}"
        )


def edit_seed(seed: int, cases: Sequence[EditCase]) -> int:
    """A seed that depends only on the edited cases, so a resumed or reordered run draws the same numbers."""
    key = "\x1f".join(c.case_id for c in cases)
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


class Journal(Generic[S]):
    """Snapshots of an editor's state, one per live edit, oldest first.

    Reverting an edit restores the state from before it, which also undoes every later edit; the
    handles of those later edits then do nothing (like restoring an earlier weight copy would).
    """

    def __init__(self) -> None:
        self._entries: list[tuple[int, S]] = []
        self._next = 0

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, snapshot: S) -> int:
        """Record the state before a new edit; returns the edit's serial number."""
        self._next += 1
        self._entries.append((self._next, snapshot))
        return self._next

    def revert(self, serial: int, restore: Callable[[S], None]) -> None:
        for index, (entry, snapshot) in enumerate(self._entries):
            if entry == serial:
                restore(snapshot)
                del self._entries[index:]
                return
