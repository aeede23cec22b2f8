"""overtone: knowledge editing of language models with the OverTone objective (ICML 2025).

The Python API in five lines::

    import overtone as ot
    lm = ot.load_model("smollm2-135m")
    editor = ot.make_editor("ft-m", lm, ot.OverTone())
    evaluator = ot.Evaluator(lm)
    record = ot.edit_and_score(editor, evaluator, ot.EditCase("demo", "The capital of France is", "Rome"))

Each name is imported on first use, so ``import overtone`` (and ``overtone --help``) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from overtone.version import __version__

if TYPE_CHECKING:
    from overtone.artifacts import EditArtifact, export_model, load_edit, save_edit
    from overtone.benchmarks import EditCase, Probe, load_benchmark
    from overtone.editors import EDITORS, EditError, EditHandle, Editor, make_editor
    from overtone.evaluation import Evaluator
    from overtone.generation import greedy_complete
    from overtone.models import LoadedModel, load_model
    from overtone.objectives import CrossEntropy, Objective, OverTone, OverToneConfig, make_objective
    from overtone.runner import ResultStore, RunSpec, check_run, edit_and_score, prepare_run, run_single_editing

# name -> the module it comes from
_SOURCES = {
    **dict.fromkeys(("EditArtifact", "export_model", "load_edit", "save_edit"), "overtone.artifacts"),
    **dict.fromkeys(("EditCase", "Probe", "load_benchmark"), "overtone.benchmarks"),
    **dict.fromkeys(("EDITORS", "EditError", "EditHandle", "Editor", "make_editor"), "overtone.editors"),
    "Evaluator": "overtone.evaluation",
    "greedy_complete": "overtone.generation",
    **dict.fromkeys(("LoadedModel", "load_model"), "overtone.models"),
    **dict.fromkeys(("CrossEntropy", "Objective", "OverTone", "OverToneConfig", "make_objective"),
                    "overtone.objectives"),
    **dict.fromkeys(("ResultStore", "RunSpec", "check_run", "edit_and_score", "prepare_run", "run_single_editing"),
                    "overtone.runner"),
}


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use."""
    if name not in _SOURCES:
        raise AttributeError(f"module 'overtone' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "EDITORS",
    "CrossEntropy",
    "EditArtifact",
    "EditCase",
    "EditError",
    "EditHandle",
    "Editor",
    "Evaluator",
    "LoadedModel",
    "Objective",
    "OverTone",
    "OverToneConfig",
    "Probe",
    "ResultStore",
    "RunSpec",
    "__version__",
    "check_run",
    "edit_and_score",
    "export_model",
    "greedy_complete",
    "load_benchmark",
    "load_edit",
    "load_model",
    "make_editor",
    "make_objective",
    "prepare_run",
    "run_single_editing",
    "save_edit",
]
