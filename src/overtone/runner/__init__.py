"""Benchmark protocols over editors and a results directory that survives interruptions."""

from overtone.runner.bench import EVAL_TIMINGS, CaseError, RunError, edit_and_score, edit_chunk, summarize
from overtone.runner.continual import run_continual, run_single_editing
from overtone.runner.store import ResultStore, StoreError, read_run

__all__ = [
    "EVAL_TIMINGS",
    "CaseError",
    "ResultStore",
    "RunError",
    "StoreError",
    "edit_and_score",
    "edit_chunk",
    "read_run",
    "run_continual",
    "run_single_editing",
    "summarize",
]
