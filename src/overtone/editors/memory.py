"""What the memory-based editors (WISE, MELO) share: an undo journal and seeds (their presets: ``editors.presets``).

Both keep their edits outside the model's weights (a side copy of a matrix, LoRA blocks) and route
each sequence to one of them at inference. Their state therefore lives in the editor: an edit's
handle holds a snapshot of that state from before the edit, and reverting the edit restores it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import EditHandle, EditStats

S = TypeVar("S")


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
