"""Editors, registered by name. A new editor is a module (or a package, when it holds more than one idea) with
an ``Editor`` subclass plus one line here; its per-model settings go in ``editors/presets/<name>.yaml``."""

from __future__ import annotations

from typing import Any

from overtone.editors.alphaedit import AlphaEdit, AlphaEditConfig
from overtone.editors.base import EditError, EditHandle, Editor, EditStack
from overtone.editors.ft_m import FTM, FTMConfig
from overtone.editors.lora import LoRA, LoRAConfig
from overtone.editors.melo import MELO, MELOConfig
from overtone.editors.memit import MEMIT, MEMITConfig
from overtone.editors.reports import EditStats, StepCallback, StepInfo
from overtone.editors.rome import ROME, ROMEConfig
from overtone.editors.ultraedit import UltraEdit, UltraEditConfig
from overtone.editors.wise import WISE, WISEConfig
from overtone.models.loading import LoadedModel
from overtone.objectives import Objective

EDITORS: dict[str, type[Editor]] = {cls.name: cls for cls in (FTM, LoRA, WISE, MELO, ROME, MEMIT, AlphaEdit, UltraEdit)}


def editor_config(name: str, **settings: Any) -> Any:
    """The config of editor ``name`` with its fields overridden by ``settings`` (None values are skipped).

    Needs no model: the command line checks settings and cases with it before loading one.
    """
    if name not in EDITORS:
        raise ValueError(f"unknown editor {name!r}; available: {', '.join(sorted(EDITORS))}")
    config_class = EDITORS[name].config_class
    fields = config_class.__dataclass_fields__
    unknown = sorted(k for k, v in settings.items() if v is not None and k not in fields)
    if unknown:
        raise ValueError(f"editor {name!r} has no setting(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    return config_class(**{k: v for k, v in settings.items() if v is not None})


def make_editor(name: str, lm: LoadedModel, objective: Objective | None = None, **settings: Any) -> Editor:
    """Build editor ``name`` with its config fields overridden by ``settings`` (None values are skipped)."""
    config = editor_config(name, **settings)  # raises for an unknown editor or setting
    return EDITORS[name](lm, config, objective)


__all__ = [
    "EDITORS",
    "FTM",
    "MELO",
    "MEMIT",
    "ROME",
    "WISE",
    "AlphaEdit",
    "AlphaEditConfig",
    "EditError",
    "EditHandle",
    "EditStack",
    "EditStats",
    "Editor",
    "FTMConfig",
    "LoRA",
    "LoRAConfig",
    "MELOConfig",
    "MEMITConfig",
    "ROMEConfig",
    "StepCallback",
    "StepInfo",
    "UltraEdit",
    "UltraEditConfig",
    "WISEConfig",
    "editor_config",
    "make_editor",
]
