"""Ctrl-C and SIGTERM as an exception that a run survives: weights reverted, nothing partial written.

The command line turns SIGINT and SIGTERM into ``Interrupted`` (``raise_on_signals``), so the
``finally``/``except BaseException`` blocks of the editors and of ``edit_chunk`` revert the weights
and a chunk in flight is never written. ``deferred_signals`` holds a signal back while a result is
being written, so a record is either on disk whole or not at all; the signal is raised right after.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)

_depth = 0  # nesting of deferred_signals blocks
_pending: list[int] = []  # signals received inside such a block


class Interrupted(KeyboardInterrupt):
    """The process received SIGINT or SIGTERM; ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handler(signum: int, _frame: FrameType | None) -> None:
    if _depth:
        _pending.append(signum)
        return
    raise Interrupted(signum)


def raise_on_signals() -> None:
    """Make SIGINT and SIGTERM raise ``Interrupted`` in the main thread (a no-op in other threads)."""
    if threading.current_thread() is threading.main_thread():
        for signum in HANDLED:
            signal.signal(signum, _handler)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold back ``Interrupted`` until the block is done (it is raised on leaving the block)."""
    global _depth
    _depth += 1
    try:
        yield
    except BaseException:
        _depth -= 1
        if not _depth:
            _pending.clear()  # the exception in flight ends the run anyway
        raise
    _depth -= 1
    if not _depth and _pending:
        signum = _pending[0]
        _pending.clear()
        raise Interrupted(signum)
