"""Editor presets as data: per-model settings and OverTone defaults, read from the YAML files here.

Adding a model, or re-tuning one, is a change of data, reviewable as a diff, not of code. Every entry
says where its values come from (a paper, the reference toolkit, a setting tuned on ZsRE development
records). ``models.yaml`` names the models by shape; each ``<editor>.yaml`` may hold:

* ``overtone``: the editor's OverTone defaults (``OverToneConfig`` fields), what ``--objective
  overtone`` uses unless ``--lambda`` / ``--n-sigma`` / ``--epsilon`` are given;
* ``models``: per model of ``models.yaml``, settings of the editor's config (fields left unset, None,
  are filled from them; explicit settings always win);
* ``fallback``: settings that every model gets for the fields its preset left unset.

Files are read once and checked against the editor's config dataclass: an unknown section, model or
setting, a missing source, or a value the config refuses is a ``PresetError`` naming the file and key.
WISE and MELO pick a model's preset by its shape (``resolve_preset``); ROME and MEMIT by its name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from functools import cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import yaml

from overtone.models.loading import LoadedModel
from overtone.objectives import OverToneConfig

C = TypeVar("C")

SECTIONS = ("overtone", "fallback", "models")


class PresetError(ValueError):
    """A preset file that cannot be used as it is."""


@dataclass(frozen=True)
class Preset:
    """One entry: settings of a config dataclass and where they come from."""

    settings: Mapping[str, Any]
    source: str


@dataclass(frozen=True)
class EditorPresets:
    """What one editor's preset file holds."""

    file: str
    models: Mapping[str, Preset]
    fallback: Preset | None = None
    overtone: OverToneConfig | None = None

    def settings(self) -> dict[str, Mapping[str, Any]]:
        """The settings of every model, by model name."""
        return {name: preset.settings for name, preset in self.models.items()}


def _shipped(name: str) -> Path:
    return Path(str(resources.files(__package__).joinpath(name)))


def _read(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PresetError(f"{path}: not valid YAML: {exc}") from exc


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PresetError(f"{where}: expected a mapping, got {value!r}")
    return value


def _tuples(value: Any) -> Any:
    """YAML lists as tuples, the type of every sequence field of the frozen configs."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _entry(value: Any, config_class: type, where: str) -> Preset:
    """One ``{source, settings}`` entry, its settings checked by building ``config_class`` from them."""
    entry = _mapping(value, where)
    unknown = sorted(set(entry) - {"source", "settings"})
    if unknown:
        raise PresetError(f"{where}: unknown key(s) {', '.join(unknown)}; an entry holds source and settings")
    source = entry.get("source")
    if not isinstance(source, str) or not source.strip():
        raise PresetError(f"{where}: needs 'source', a sentence saying where its values come from")
    settings = {k: _tuples(v) for k, v in _mapping(entry.get("settings"), f"{where}.settings").items()}
    known = [f.name for f in fields(config_class)]
    for key in settings:
        if key not in known:
            raise PresetError(f"{where}.settings: unknown setting {key!r} of {config_class.__name__}; "
                              f"known: {', '.join(known)}")
    try:
        config_class(**settings)
    except (TypeError, ValueError) as exc:
        raise PresetError(f"{where}.settings: {', '.join(settings)}: {exc}") from exc
    return Preset(MappingProxyType(settings), source.strip())


@cache
def model_shapes() -> Mapping[str, Mapping[str, Any]]:
    """The shape (config.json fields) of every model that presets are made for, by model name."""
    path = _shipped("models.yaml")
    shapes = {}
    for name, entry in _mapping(_read(path), str(path)).items():
        entry = _mapping(entry, f"{path}: {name}")
        if not isinstance(entry.get("source"), str) or set(entry) != {"source", "shape"}:
            raise PresetError(f"{path}: {name}: an entry holds source and shape")
        shapes[name] = MappingProxyType(dict(_mapping(entry["shape"], f"{path}: {name}.shape")))
    return MappingProxyType(shapes)


def load_presets(path: Path, config_class: type) -> EditorPresets:
    """The presets in ``path`` for an editor whose config is ``config_class``; a ``PresetError`` names what
    is wrong."""
    data = _read(path)
    data = {} if data is None else _mapping(data, str(path))
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise PresetError(f"{path}: unknown section {unknown[0]!r}; known: {', '.join(SECTIONS)}")
    shapes = model_shapes()
    models = {}
    for name, entry in _mapping(data.get("models", {}), f"{path}: models").items():
        if name not in shapes:
            raise PresetError(f"{path}: models: unknown model {name!r}; known: {', '.join(shapes)} "
                              "(a new model is first named with its shape in models.yaml)")
        models[name] = _entry(entry, config_class, f"{path}: models.{name}")
    fallback = _entry(data["fallback"], config_class, f"{path}: fallback") if "fallback" in data else None
    overtone = None
    if "overtone" in data:
        overtone = OverToneConfig(**_entry(data["overtone"], OverToneConfig, f"{path}: overtone").settings)
    return EditorPresets(str(path), MappingProxyType(models), fallback, overtone)


@cache
def editor_presets(editor: str, config_class: type) -> EditorPresets:
    """The shipped presets of ``editor`` (``<editor>.yaml`` here; none if there is no file), read once."""
    path = _shipped(f"{editor}.yaml")
    return load_presets(path, config_class) if path.is_file() else EditorPresets(str(path), MappingProxyType({}))


def overtone_preset(editor: str, config_class: type) -> OverToneConfig:
    """The editor's OverTone defaults from its preset file, else the objective's own."""
    return editor_presets(editor, config_class).overtone or OverToneConfig()


def shape_of(lm: LoadedModel) -> dict[str, Any]:
    """The fields of the model's config that name its architecture and size."""
    config = lm.model.config
    return {key: getattr(config, key, None) for key in next(iter(model_shapes().values()))}


def matching_preset(lm: LoadedModel, presets: Mapping[str, Any]) -> str | None:
    """The preset whose model has the loaded model's architecture and size, if any."""
    shape = shape_of(lm)
    return next((name for name in presets if model_shapes().get(name) == shape), None)


def resolve_preset(config: C, presets: EditorPresets, lm: LoadedModel, editor: str,
                   required: Sequence[str] = (), hint: str = "") -> C:
    """Fill the unset (None) fields of ``config`` from a preset, then from the editor's fallback.

    The preset is ``config.preset`` if given, else the one made for a model of the loaded model's
    architecture and size (``models.yaml``), else none. Fields set explicitly always win. A field of
    ``required`` that is still unset is an error naming ``--set preset=`` and the fields: a preset is
    never borrowed from a model of another size without the user saying so.
    """
    by_model = presets.settings()
    name = getattr(config, "preset", None)
    if name is None:
        name = matching_preset(lm, by_model)
    elif name not in by_model:
        raise ValueError(f"{editor}: unknown preset {name!r}; available: {', '.join(sorted(by_model))}")
    known = {f.name for f in fields(config)}  # type: ignore[arg-type]
    for values in ([by_model[name]] if name is not None else []) + (
            [presets.fallback.settings] if presets.fallback else []):
        config = replace(config, **{k: v for k, v in values.items() if k in known and getattr(config, k) is None})
    if name is not None:
        config = replace(config, preset=name)  # type: ignore[type-var]
    shapes = model_shapes()
    missing_settings(config, required, editor, lm,
                     f"Presets: {', '.join(sorted(by_model))}, made for models of these shapes: " + "; ".join(
                         f"{n} = {shapes[n]['model_type']}, {shapes[n]['num_hidden_layers']} layers, "
                         f"hidden {shapes[n]['hidden_size']}" for n in sorted(by_model))
                     + f"; this model: {shape_of(lm)}. {hint}".rstrip())
    return config


def missing_settings(config: Any, names: Sequence[str], editor: str, lm: LoadedModel, hint: str) -> None:
    """Raise a clear error naming every required setting that neither the user nor a preset gave."""
    missing = [n for n in names if getattr(config, n) is None]
    if missing:
        raise ValueError(
            f"{editor} has no preset for model {lm.name!r}; choose one with --set preset=NAME or set "
            f"{', '.join(missing)} (e.g. --set {missing[0]}=...). {hint}"
        )
