"""Benchmark protocols over editors and a results directory that survives interruptions; one runner
(``RunSpec`` -> ``check_run`` -> ``prepare_run`` -> ``PreparedRun.execute``) for every command that edits.

Names are imported on first use, so the run directory's lock (``runner.store``) is taken without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from overtone.runner.bench import EVAL_TIMINGS, CaseError, RunError, edit_and_score, edit_chunk, summarize
    from overtone.runner.continual import run_continual, run_single_editing
    from overtone.runner.run import PreparedRun, RunInputs, check_run, prepare_run
    from overtone.runner.spec import RunSpec, SpecError
    from overtone.runner.store import ResultStore, StoreError, read_run

# name -> the module it comes from
_SOURCES = {
    **dict.fromkeys(("EVAL_TIMINGS", "CaseError", "RunError", "edit_and_score", "edit_chunk", "summarize"),
                    "overtone.runner.bench"),
    **dict.fromkeys(("run_continual", "run_single_editing"), "overtone.runner.continual"),
    **dict.fromkeys(("PreparedRun", "RunInputs", "check_run", "prepare_run"), "overtone.runner.run"),
    **dict.fromkeys(("RunSpec", "SpecError"), "overtone.runner.spec"),
    **dict.fromkeys(("ResultStore", "StoreError", "read_run"), "overtone.runner.store"),
}


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use."""
    if name not in _SOURCES:
        raise AttributeError(f"module 'overtone.runner' has no attribute {name!r}")
    return getattr(importlib.import_module(_SOURCES[name]), name)


__all__ = [
    "EVAL_TIMINGS",
    "CaseError",
    "PreparedRun",
    "ResultStore",
    "RunError",
    "RunInputs",
    "RunSpec",
    "SpecError",
    "StoreError",
    "check_run",
    "edit_and_score",
    "edit_chunk",
    "prepare_run",
    "read_run",
    "run_continual",
    "run_single_editing",
    "summarize",
]
