"""Benchmark protocols over editors and a results directory that survives interruptions; one runner
(``RunSpec`` -> ``check_run`` -> ``prepare_run`` -> ``PreparedRun.execute``) for every command that edits."""

from overtone.runner.bench import EVAL_TIMINGS, CaseError, RunError, edit_and_score, edit_chunk, summarize
from overtone.runner.continual import run_continual, run_single_editing
from overtone.runner.run import PreparedRun, RunInputs, check_run, prepare_run
from overtone.runner.spec import RunSpec, SpecError
from overtone.runner.store import ResultStore, StoreError, read_run

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
