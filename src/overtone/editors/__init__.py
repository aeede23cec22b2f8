"""Editors, registered by name. A new editor is a module with an ``Editor`` subclass plus one line here."""

from __future__ import annotations

import types
import typing
from typing import Any

import yaml

from overtone.editors.base import EditError, EditHandle, Editor, EditStats, StepCallback, StepInfo
from overtone.editors.ft_m import FTM, FTMConfig
from overtone.editors.melo import MELO, MELOConfig
from overtone.editors.wise import WISE, WISEConfig
from overtone.models.loading import LoadedModel
from overtone.objectives import Objective

EDITORS: dict[str, type[Editor]] = {cls.name: cls for cls in (FTM, WISE, MELO)}


def _editor_class(name: str) -> type[Editor]:
    if name not in EDITORS:
        raise ValueError(f"unknown editor {name!r}; available: {', '.join(sorted(EDITORS))}")
    return EDITORS[name]


def make_editor(name: str, lm: LoadedModel, objective: Objective | None = None, **settings: Any) -> Editor:
    """Build editor ``name`` with its config fields overridden by ``settings`` (None values are skipped)."""
    cls = _editor_class(name)
    settings = {k: v for k, v in settings.items() if v is not None}
    fields = cls.config_class.__dataclass_fields__
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise ValueError(f"editor {name!r} has no setting(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    return cls(lm, cls.config_class(**settings), objective)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` (parsed YAML) as the type ``hint`` of a config field, or a ValueError naming ``where``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0])
    if origin is tuple:
        items = value if isinstance(value, list) else [value]
        return tuple(_coerce(item, args[0], where) for item in items)
    if hint is float and not isinstance(value, bool):
        try:
            return float(value)  # also YAML 1.1's strings such as "1e-3"
        except (TypeError, ValueError):
            pass
    if hint is str and value is not None and not isinstance(value, (list, dict)):
        return str(value)
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def parse_settings(name: str, assignments: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (VALUE in YAML: ``0.6``, ``[22, 23]``, ``null``) as typed settings of editor ``name``."""
    cls = _editor_class(name)
    hints = typing.get_type_hints(cls.config_class)
    settings: dict[str, Any] = {}
    for text in assignments:
        key, sep, raw = text.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"setting {text!r} is not KEY=VALUE")
        if key not in hints:
            raise ValueError(f"editor {name!r} has no setting {key!r}; known: {', '.join(hints)}")
        settings[key] = _coerce(yaml.safe_load(raw) if raw.strip() else None, hints[key], f"setting {key}")
    return settings


__all__ = [
    "EDITORS",
    "FTM",
    "MELO",
    "WISE",
    "EditError",
    "EditHandle",
    "EditStats",
    "Editor",
    "FTMConfig",
    "MELOConfig",
    "StepCallback",
    "StepInfo",
    "WISEConfig",
    "make_editor",
    "parse_settings",
]
