"""Setting values as a config dataclass's field types want them: one coercer for ``--set KEY=VALUE`` strings
and for the values of a study file (YAML), so both accept and refuse the same things with the same words.

A string is parsed (``"5e-3"`` a float, ``"3,4"`` a tuple, ``"5,10;10,10"`` pairs, ``"none"`` None where
allowed); a YAML value of the right kind passes as it is (lists become tuples). A number must be finite
(``nan`` and ``inf`` are refused: no setting means them). Errors name the key.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any


class SettingError(ValueError):
    """A setting's key or value does not fit its config; the message names the key."""


def _tuple_parts(value: Any, args: tuple[Any, ...], where: str) -> list[Any]:
    if isinstance(value, str):
        # "3,4,5" for tuple[int, ...]; pairs for tuple[tuple[int, int], ...] are separated by ";": "5,10;10,10"
        return [part for part in value.split(";" if typing.get_origin(args[0]) is tuple else ",") if part.strip()]
    if isinstance(value, list | tuple):
        return list(value)
    raise SettingError(f"{where}: expected a list, got {value!r}")


def coerce(value: Any, kind: Any, where: str) -> Any:
    """``value`` (a string from the command line, or a YAML value) as the field type ``kind`` wants it."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    text = value.strip() if isinstance(value, str) else None
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (text is not None and text.lower() == "none")):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except SettingError as exc:
                errors.append(str(exc))
        raise SettingError(errors[0])
    if origin is tuple:
        parts = _tuple_parts(value, args, where)
        if args and args[-1] is Ellipsis:
            return tuple(coerce(v, args[0], where) for v in parts)
        if len(parts) != len(args):
            raise SettingError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(coerce(v, a, where) for v, a in zip(parts, args, strict=True))
    if origin is typing.Literal:
        chosen = next((a for a in args if a == value or (text is not None and str(a) == text)), None)
        if chosen is None:
            raise SettingError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        return chosen
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in ("true", "false", "1", "0"):
            return text.lower() in ("true", "1")
        raise SettingError(f"{where}: expected true or false, got {value!r}")
    if kind in (int, float):
        return _number(value, kind, where)
    if kind is str:
        if not isinstance(value, str):
            raise SettingError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _number(value: Any, kind: type, where: str) -> int | float:
    wanted = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise SettingError(f"{where}: expected {wanted}, got {value!r}")
    try:
        number = float(value) if kind is float else int(value) if not isinstance(value, float) else None
    except ValueError:
        number = None
    if kind is int and isinstance(value, float) and value.is_integer():
        number = int(value)
    if number is None:
        raise SettingError(f"{where}: expected {wanted}, got {value!r}")
    if not math.isfinite(number):
        raise SettingError(f"{where}: expected a finite number, got {value!r}")
    return number


def check_finite(values: Mapping[str, Any], where: str) -> None:
    """Refuse a NaN or an infinity among ``values`` (also inside tuples), naming ``where`` and the key: values
    that did not come through ``coerce`` (typed options such as ``--lr``)."""
    for key, value in values.items():
        numbers = value if isinstance(value, tuple | list) else (value,)
        for number in numbers:
            inner = number if isinstance(number, tuple | list) else (number,)
            if any(isinstance(x, float) and not math.isfinite(x) for x in inner):
                raise SettingError(f"{where} {key}={value!r}: expected a finite number")


def typed(cls: type, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``values`` checked against the fields of dataclass ``cls`` and coerced to their types (a study file's)."""
    if not isinstance(values, Mapping):
        raise SettingError(f"{where}: expected a mapping of settings, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    out = {}
    for key, value in values.items():
        if key not in known:
            raise SettingError(f"{where}: unknown setting {key!r}; known: {', '.join(known)}")
        out[key] = coerce(value, hints[key], f"{where}.{key}")
    return out


def parse_items(items: Sequence[str], cls: type, name: str, given: Mapping[str, Any] = types.MappingProxyType({})
                ) -> dict[str, Any]:
    """``KEY=VALUE`` items (``--set``) as settings of config dataclass ``cls`` (of editor ``name``); a key may
    not repeat one of ``given`` (settings with their own option) or an earlier item."""
    hints = typing.get_type_hints(cls)
    settings: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in hints:
            raise SettingError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(hints)} ({name})")
        if key in settings or key in given:
            raise SettingError(f"--set {item!r}: {key} is already set (by its own option or an earlier --set)")
        settings[key] = coerce(value, hints[key], f"--set {item!r}")
    return settings
