"""Benchmark protocols over editors and a results directory that survives interruptions."""

from overtone.runner.bench import RunError, edit_and_score, run_single_editing, summarize
from overtone.runner.store import ResultStore, StoreError, read_run

__all__ = ["ResultStore", "RunError", "StoreError", "edit_and_score", "read_run", "run_single_editing", "summarize"]
