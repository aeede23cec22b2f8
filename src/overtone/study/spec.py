"""A study file: the axes and fixed settings of a grid of runs, expanded into cells with deterministic ids.

A study is what a paper table is made of: models x datasets x protocols (T) x editors x variants (CE,
OverTone, its ablations, a tuning grid) x seeds. The YAML file (docs/studies.md) has

* ``fixed``: settings shared by every cell (model, device, dtype, dataset, offset, limit, sequence,
  eval_timing, batch, seed, threads, generation; ``evaluation`` and ``eval_context`` as ``--eval`` and
  ``--eval-context``, ``ability`` as ``--ability``, ``ability_every`` as ``--ability-every``, ``stream`` (null, true
  or a mapping of ``runner.stream.StreamSettings``) as ``--stream`` and its options, ``parallel``
  as ``--parallel``, ``eval_cache`` as ``--eval-cache/--no-eval-cache``);
* ``axes``: lists of values of ``model``, ``dataset``, ``sequence``, ``editor``, ``variant``, ``seed``;
  a key is either fixed or an axis;
* ``editors``: per editor, its ``settings``, its ``overtone`` hyper-parameters (over the editor's tuned
  defaults) and ``objective_settings`` that apply only to rows of one objective (WISE's threshold
  shrinkage with OverTone in the paper);
* ``profiles``: named overlays (e.g. the paper's Llama-2-7B settings) merged over the file by ``--profile``.

A cell's id is a hash of everything that changes its results: the package version, the model (name,
device, dtype), the dataset (and a file's content), the protocol, the editor's full resolved settings,
the objective, the seed, the evaluation (wild, ability) and the id of the cell it takes step budgets
from. The code's git revision is not in it (each cell's ``config.yaml`` records it, ``runner.config``).
``limit``, ``threads``, ``parallel`` and ``eval_cache`` are not in it: a larger ``limit`` extends the same
cells, cases edited side by side give the results of one at a time, and the evaluation cache changes no
record. ``parallel`` applies to the single-editing cells of editors that can edit side by side; the others run
one case at a time.
Editors without a ``seed`` setting (FT-M, ROME, MEMIT) have no random parts: a seed axis collapses
to its first seed for them, and the plan says so.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from overtone.objectives import OBJECTIVES, TIES, OverToneConfig, make_objective
from overtone.runner.settings import SettingError, typed
from overtone.runner.settings import coerce as settings_coerce
from overtone.runner.variants import (
    Variant,
    ablation_variants,
    full_overtone,
    matched_steps_controls,
    sweep_variants,
)
from overtone.version import __version__

AXES = ("model", "dataset", "sequence", "editor", "variant", "seed")  # expansion order, outermost first
FIXED_DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m", "device": "auto", "dtype": "fp32", "offset": 0, "limit": None, "sequence": 1,
    "eval_timing": "end", "batch": 1, "seed": 0, "threads": 1, "generation": {}, "variant": ["ce", "overtone"],
    "evaluation": "teacher-forced", "eval_context": "bare", "ability": False, "ability_every": 0, "parallel": 1,
    "stream": None, "eval_cache": True,
}
REQUIRED = ("editor", "dataset")
EDITOR_KEYS = ("settings", "overtone", "objective_settings")
TOP_KEYS = ("name", "description", "fixed", "axes", "editors", "profiles", "profile")
# Settings a user may override from the command line (``overtone study run --model ...``).
OVERRIDABLE = ("model", "device", "dtype", "offset", "limit", "threads", "evaluation", "eval_context", "ability",
               "ability_every", "parallel", "eval_cache")


class StudyError(ValueError):
    """A study file (or its overrides) is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class ModelSpec:
    """What a worker loads: one model at a time is kept, keyed by this."""

    name: str
    device: str
    dtype: str

    @property
    def short(self) -> str:
        return Path(self.name).name or self.name


@dataclass(frozen=True)
class Cell:
    """One run of a study: a run directory of its own (``config.yaml``, ``cases.jsonl``, ``summary.json``)."""

    id: str
    model: ModelSpec
    editor: str
    variant: Variant
    settings: tuple[tuple[str, Any], ...]  # editor config overrides: study, objective, variant and seed
    dataset: str
    offset: int
    limit: int | None
    sequence: int
    eval_timing: str
    batch: int
    seed: int
    generation: tuple[tuple[str, Any], ...] = ()
    after: str | None = None  # id of the cell whose per-case update counts this one trains for
    deterministic: bool = False  # the editor has no random parts (no ``seed`` setting)
    evaluation: str = "teacher-forced"  # --eval
    eval_context: str = "bare"  # --eval-context
    ability: bool = False  # --ability
    ability_every: int = 0  # --ability-every
    parallel: int | str = 1  # --parallel (1 for cells that cannot edit side by side)
    stream: tuple[tuple[str, Any], ...] | None = None  # --stream and its settings (runner.stream.StreamSettings)
    eval_cache: bool = True  # --eval-cache / --no-eval-cache

    @property
    def editor_settings(self) -> dict[str, Any]:
        return dict(self.settings)

    @property
    def name(self) -> str:
        """Directory name: readable axes, then the id (which alone identifies the cell)."""
        return ".".join([self.model.short, self.editor, dataset_short(self.dataset), f"T{self.sequence}",
                         self.variant.slug, f"s{self.seed}", self.id[:8]])

    @property
    def protocol(self) -> str:
        return "single" if self.sequence == 1 else "continual" if self.batch == 1 else "batch"

    def run_spec(self, threads: int = 1) -> Any:
        """The cell as the runner takes it (``runner.spec.RunSpec``): what a worker runs and what is
        checked with the tokenizer before the study starts."""
        from overtone.runner.spec import RunSpec

        return RunSpec(
            editor=self.editor, dataset=self.dataset, objective=self.variant.objective, model=self.model.name,
            device=self.model.device, dtype=self.model.dtype, threads=threads, offset=self.offset, limit=self.limit,
            settings=self.settings, overtone=self.variant.overtone, sequence=self.sequence, batch=self.batch,
            eval_timing=self.eval_timing, evaluation=self.evaluation, eval_context=self.eval_context,
            generation=self.generation, ability=self.ability, ability_every=self.ability_every,
            parallel=self.parallel, seed=self.seed, matched=self.variant.match_steps, eval_cache=self.eval_cache,
            **({"stream": True, **dict(self.stream)} if self.stream is not None else {}))

    def describe(self) -> dict[str, Any]:
        """The cell as ``plan.json`` lists it."""
        return {"id": self.id, "dir": self.name, "model": asdict(self.model), "editor": self.editor,
                "variant": self.variant.slug, "label": self.variant.label, "objective": self.variant.objective,
                "dataset": self.dataset, "offset": self.offset, "limit": self.limit, "sequence": self.sequence,
                "eval_timing": self.eval_timing, "batch": self.batch, "seed": self.seed,
                "deterministic": self.deterministic, "after": self.after,
                "match_steps": self.variant.match_steps, "evaluation": self.evaluation,
                "eval_context": self.eval_context, "ability": self.ability, "ability_every": self.ability_every,
                "parallel": self.parallel, "stream": None if self.stream is None else dict(self.stream),
                "eval_cache": self.eval_cache}


@dataclass
class Study:
    """The expanded study: its cells in plan order, the resolved spec, and notes for the plan."""

    name: str
    description: str
    spec: dict[str, Any]  # the resolved file (profile and overrides applied), written next to the cells
    cells: list[Cell]
    threads: int
    notes: list[str] = field(default_factory=list)

    def cell(self, cell_id: str) -> Cell:
        return next(c for c in self.cells if c.id == cell_id)


def dataset_short(dataset: str) -> str:
    from overtone.benchmarks import BENCHMARKS

    return dataset if dataset in BENCHMARKS else Path(dataset).stem


# ---------------------------------------------------------------------------------------------- values


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def coerce(value: Any, kind: Any, where: str) -> Any:
    """A YAML value as the field type ``kind`` wants it (``runner.settings.coerce``, the one coercer of
    settings, which ``--set`` uses too); a ``StudyError`` naming ``where``."""
    try:
        return settings_coerce(value, kind, where)
    except SettingError as exc:
        raise StudyError(str(exc)) from exc


def _typed(cls: type, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``values`` checked against the fields of dataclass ``cls`` and coerced to their types."""
    try:
        return typed(cls, values, where)
    except SettingError as exc:
        raise StudyError(str(exc)) from exc


def _merge(base: Any, overlay: Any) -> Any:
    """Mappings merge key by key; anything else is replaced."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        out = dict(base)
        for key, value in overlay.items():
            out[key] = _merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(overlay)


def _mapping(value: Any, at: str) -> dict[Any, Any]:
    """``value`` when it is a mapping (None: an empty one); anything else is refused naming ``at``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StudyError(f"{at} must be a mapping, got {type(value).__name__} {value!r:.60}")
    return value


@cache
def _file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _dataset_identity(dataset: str, offset: int, where: str) -> dict[str, Any]:
    from overtone.benchmarks import BENCHMARKS, DatasetError, resolve_dataset

    try:
        bench = resolve_dataset(dataset)
    except (DatasetError, ValueError, OSError) as exc:
        raise StudyError(f"{where}: dataset {dataset!r:.80}: {exc}") from exc
    identity: dict[str, Any] = {"name": bench.name, "offset": offset}
    if dataset not in BENCHMARKS:  # a user's file: its content, not its path, decides the results
        identity["sha256"] = _file_sha256(str(bench.file))
    return identity


def cell_id(material: dict[str, Any]) -> str:
    """12 hex digits of the SHA-256 of the canonical JSON of what decides a cell's results."""
    text = json.dumps(material, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------- variants


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.=-]+", "-", text.lower()).strip("-") or "variant"


def _listed(options: Mapping[str, Any], key: str, default: list[Any], where: str) -> list[Any]:
    """``options[key]`` as a list (``default`` when absent), or a ``StudyError`` naming ``where.key``."""
    value = options.get(key, default)
    if not isinstance(value, list):
        raise StudyError(f"{where}.{key}: give a list, got {value!r}")
    return value


def _variants(items: Sequence[Any], editor: str, base: OverToneConfig, where: str) -> list[Variant]:
    """The rows one ``variant`` axis gives an editor: named rows, the ablation, a sweep, or custom rows."""
    from overtone.editors import EDITORS

    out: list[Variant] = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if item == "ce":
            out.append(Variant("ce", "CE", "ce", base))
        elif item == "overtone":
            out.append(Variant("overtone", "OverTone", "overtone", base))
        elif isinstance(item, dict) and set(item) == {"ablation"}:
            options = _mapping(item["ablation"], f"{at}.ablation")
            unknown = set(options) - {"stop_grid", "chk_lambda"}
            if unknown:
                raise StudyError(f"{at}.ablation: unknown option(s) {', '.join(sorted(map(str, unknown)))}; "
                                 "known: stop_grid, chk_lambda")
            default_stop = getattr(EDITORS[editor].config_class(), "stop_loss", None)
            # a CE control at the editor's own stop rule would repeat the CE row
            grid = [t for t in (coerce(t, float, f"{at}.ablation.stop_grid")
                                for t in _listed(options, "stop_grid", [], f"{at}.ablation"))
                    if t != default_stop]
            chk = coerce(options.get("chk_lambda", 0.1), float, f"{at}.ablation.chk_lambda")
            try:
                rows = ablation_variants(base, grid, chk)
            except ValueError as exc:
                raise StudyError(f"{at}.ablation: {exc}") from None
            out += rows + matched_steps_controls(rows)
        elif isinstance(item, dict) and set(item) == {"sweep"}:
            grid = _mapping(item["sweep"] or {}, f"{at}.sweep")
            unknown = set(grid) - {"lambda", "n_sigma", "epsilon", "tie"}
            if unknown or not grid:
                raise StudyError(f"{at}.sweep: give lists of lambda, n_sigma and epsilon (and optionally tie)")
            values = {k: [coerce(v, float, f"{at}.sweep.{k}") for v in _listed(grid, k, [getattr(base, a)],
                                                                                f"{at}.sweep")]
                      for k, a in (("lambda", "lam"), ("n_sigma", "n_sigma"), ("epsilon", "epsilon"))}
            ties = [coerce(v, str, f"{at}.sweep.tie") for v in _listed(grid, "tie", [], f"{at}.sweep")]
            bad = [v for v in ties if v not in TIES]
            if bad:
                raise StudyError(f"{at}.sweep.tie: {', '.join(bad)}; choose from {', '.join(TIES)}")
            try:
                out += sweep_variants(base, values["lambda"], values["n_sigma"], values["epsilon"], ties)
            except ValueError as exc:
                raise StudyError(f"{at}.sweep: {exc}") from None
        elif isinstance(item, dict) and "objective" in item:
            unknown = set(item) - {"name", "objective", "overtone", "settings"}
            if unknown:
                raise StudyError(f"{at}: unknown key(s) {', '.join(sorted(unknown))}; "
                                 "known: name, objective, overtone, settings")
            if item["objective"] not in OBJECTIVES:
                raise StudyError(f"{at}.objective: {item['objective']!r} is not one of {', '.join(OBJECTIVES)}")
            try:
                cfg = replace(base, **_typed(OverToneConfig, item.get("overtone") or {}, f"{at}.overtone"))
            except (TypeError, ValueError) as exc:
                raise StudyError(f"{at}.overtone: {exc}") from exc
            settings = _typed(EDITORS[editor].config_class, item.get("settings") or {}, f"{at}.settings")
            name = str(item.get("name") or item["objective"])
            out.append(Variant(_slug(name), name, item["objective"], cfg, tuple(sorted(settings.items()))))
        else:
            raise StudyError(f"{at}: expected ce, overtone, {{ablation: ...}}, {{sweep: ...}} or "
                             f"{{name: ..., objective: ..., overtone: ..., settings: ...}}, got {item!r}")
    unique: dict[str, Variant] = {}
    for v in out:
        if v.slug in unique and unique[v.slug] != v:
            raise StudyError(f"{where}: two different rows are both named {v.slug!r}")
        unique[v.slug] = v
    return list(unique.values())


# ---------------------------------------------------------------------------------------------- loading


def read_spec(source: Path | str | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The raw spec of a study file (or an already built mapping) and the name errors refer to it by."""
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source)), "study"
    path = Path(source)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise StudyError(f"{path}: cannot read the study file ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(spec, dict):
        raise StudyError(f"{path}: a study file is a mapping with keys {', '.join(TOP_KEYS)}")
    return spec, str(path)


def resolve_spec(spec: dict[str, Any], where: str, profile: str | None = None,
                 overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The spec with ``profile`` merged over it and command-line ``overrides`` (None = not given) applied."""
    unknown = set(spec) - set(TOP_KEYS)
    if unknown:
        raise StudyError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(TOP_KEYS)}")
    profiles = spec.pop("profiles", None) or {}
    if profile is not None:
        if profile not in profiles:
            raise StudyError(f"{where}: no profile {profile!r}; profiles: {', '.join(profiles) or 'none'}")
        overlay = profiles[profile] or {}
        bad = set(overlay) - {"fixed", "axes", "editors", "description"}
        if bad:
            raise StudyError(f"{where}: profiles.{profile}: unknown key(s) {', '.join(sorted(bad))}")
        spec = _merge(spec, overlay)
        # a profile may turn a fixed setting into an axis or back
        for mine, other in (("axes", "fixed"), ("fixed", "axes")):
            for key in overlay.get(mine) or {}:
                (spec.get(other) or {}).pop(key, None)
        spec["profile"] = profile
    spec.setdefault("fixed", {})
    spec.setdefault("axes", {})
    for key, value in (overrides or {}).items():
        if key not in OVERRIDABLE:
            raise StudyError(f"{key} cannot be overridden; overridable: {', '.join(OVERRIDABLE)}")
        if value is not None:
            spec["axes"].pop(key, None)
            spec["fixed"][key] = value
    return spec


def load_study(source: Path | str | Mapping[str, Any], profile: str | None = None,
               overrides: Mapping[str, Any] | None = None) -> Study:
    """Read and expand a study (a YAML file or a mapping of the same shape); errors name the key."""
    raw, where = read_spec(source)
    spec = resolve_spec(raw, where, profile, overrides)
    return expand(spec, where)


def _axes(spec: dict[str, Any], where: str) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    fixed, axes = spec.get("fixed") or {}, spec.get("axes") or {}
    if not isinstance(fixed, dict) or not isinstance(axes, dict):
        raise StudyError(f"{where}: fixed and axes are mappings")
    unknown = (set(fixed) - set(FIXED_DEFAULTS) - set(REQUIRED)) | (set(axes) - set(AXES))
    if unknown:
        raise StudyError(f"{where}: unknown setting(s) {', '.join(sorted(map(str, unknown)))}; fixed settings: "
                         f"{', '.join([*REQUIRED, *FIXED_DEFAULTS])}; axes: {', '.join(AXES)}")
    both = set(fixed) & set(axes)
    if both:
        raise StudyError(f"{where}: {', '.join(sorted(both))} is both fixed and an axis; give it once")
    values = {**FIXED_DEFAULTS, **fixed}
    lists: dict[str, list[Any]] = {}
    for name in AXES:
        if name in axes:
            given = axes[name]
            if not isinstance(given, list) or not given:
                raise StudyError(f"{where}: axes.{name} must be a non-empty list")
            lists[name] = given
        elif name in values:
            lists[name] = values[name] if name == "variant" else [values[name]]
        else:
            raise StudyError(f"{where}: {name} is neither fixed nor an axis")
    for key in REQUIRED:
        if key not in lists:
            raise StudyError(f"{where}: give {key} (fixed or an axis)")
    return lists, values


def _evaluation(values: dict[str, Any], where: str) -> dict[str, Any]:
    """The evaluation settings as a cell's id takes them: nothing for the default (teacher-forced, no ability
    check), so the ids of such studies do not change when an evaluation option is added."""
    from overtone.evaluation.wild import CONTEXTS, EVAL_MODES

    mode, context = values["evaluation"], values["eval_context"]
    if mode not in EVAL_MODES:
        raise StudyError(f"{where}: evaluation {mode!r} is not one of {', '.join(EVAL_MODES)}")
    if context not in CONTEXTS:
        raise StudyError(f"{where}: eval_context {context!r} is not one of {', '.join(CONTEXTS)}")
    if context != "bare" and mode == "teacher-forced":
        raise StudyError(f"{where}: eval_context {context} applies to the wild evaluation (evaluation: wild or both)")
    every = coerce(values["ability_every"], int, f"{where}: ability_every")
    if every < 0:
        raise StudyError(f"{where}: ability_every must be >= 0 (0: at each chunk's end only)")
    ability = coerce(values["ability"], bool, f"{where}: ability") or every > 0
    return {**({"evaluation": {"mode": mode, "context": context}} if mode != "teacher-forced" else {}),
            **({"ability": True} if ability else {}), **({"ability_every": every} if every else {})}


def _stream(value: Any, where: str) -> tuple[tuple[str, Any], ...] | None:
    """``stream``: null or false (chunks edited as continual editing), true (an edit stream with the default
    settings) or a mapping of ``runner.stream.StreamSettings`` (``curve_every``, ``curve_sample``, ...)."""
    from overtone.runner.stream import StreamSettings

    if value is None or value is False:
        return None
    given = {} if value is True else _typed(StreamSettings, value, f"{where}: stream")
    try:
        settings = StreamSettings(**given)
    except ValueError as exc:
        raise StudyError(f"{where}: stream: {exc}") from exc
    return tuple(sorted(asdict(settings).items()))


def _parallel(value: Any, where: str) -> int | str:
    if value == "auto":
        return value
    number = coerce(value, int, f"{where}: parallel")
    if number < 1:
        raise StudyError(f"{where}: parallel must be >= 1 or auto, got {value!r}")
    return number


def expand(spec: dict[str, Any], where: str = "study") -> Study:
    """The cells of a resolved spec, in plan order (axes nested as in ``AXES``)."""
    from overtone.editors import EDITORS
    from overtone.evaluation import GenerationSettings
    from overtone.models.loading import DTYPES
    from overtone.runner.stream import StreamSettings

    lists, values = _axes(spec, where)
    editors_cfg = spec.get("editors") or {}
    if not isinstance(editors_cfg, dict):
        raise StudyError(f"{where}: editors must map editor names to their settings")
    for name, cfg in editors_cfg.items():
        if name not in EDITORS:
            raise StudyError(f"{where}: editors.{name}: unknown editor; available: {', '.join(sorted(EDITORS))}")
        bad = set(_mapping(cfg, f"{where}: editors.{name}")) - set(EDITOR_KEYS)
        if bad:
            raise StudyError(f"{where}: editors.{name}: unknown key(s) {', '.join(sorted(bad))}; "
                             f"known: {', '.join(EDITOR_KEYS)}")
    for name in lists["editor"]:
        if not isinstance(name, str) or name not in EDITORS:
            raise StudyError(f"{where}: editor {name!r} is unknown; available: {', '.join(sorted(EDITORS))}")
    device, dtype = str(values["device"]), str(values["dtype"])
    if dtype not in DTYPES:
        raise StudyError(f"{where}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    scalars = {k: coerce(values[k], t, f"{where}: {k}") for k, t in
               (("offset", int), ("batch", int), ("threads", int), ("eval_timing", str))}
    limit = None if values["limit"] is None else coerce(values["limit"], int, f"{where}: limit")
    if scalars["offset"] < 0 or (limit is not None and limit < 0) or scalars["threads"] < 1 or scalars["batch"] < 1:
        raise StudyError(f"{where}: offset and limit must be >= 0, threads and batch >= 1")
    if scalars["eval_timing"] not in ("end", "after-each"):
        raise StudyError(f"{where}: eval_timing must be end or after-each")
    given = _typed(GenerationSettings, values["generation"] or {}, f"{where}: generation")
    if "seed" in given:
        raise StudyError(f"{where}: generation.seed is set by the seed axis")
    try:
        generation = asdict(GenerationSettings(**given))
    except (TypeError, ValueError) as exc:
        raise StudyError(f"{where}: generation: {exc}") from exc
    generation.pop("seed")  # the cell's seed is in the id already
    given_generation = tuple(sorted(given.items()))
    evaluation = _evaluation(values, where)
    parallel = _parallel(values["parallel"], where)
    eval_cache = coerce(values["eval_cache"], bool, f"{where}: eval_cache")
    stream = _stream(values["stream"], where)
    if stream is not None and scalars["eval_timing"] != "end":
        raise StudyError(f"{where}: a stream evaluates every edit on its final model: eval_timing must be end")

    cells: list[Cell] = []
    notes: list[str] = []
    by_key: dict[tuple[Any, ...], str] = {}  # (cell axes without the variant, variant slug) -> id
    for model_name in lists["model"]:
        model = ModelSpec(str(model_name), device, dtype)
        for dataset in lists["dataset"]:
            dataset = str(dataset)
            identity = _dataset_identity(dataset, scalars["offset"], f"{where}: dataset {dataset!r}")
            for sequence in lists["sequence"]:
                sequence = coerce(sequence, int, f"{where}: sequence")
                if sequence < 1 or scalars["batch"] > sequence:
                    raise StudyError(f"{where}: sequence {sequence}: T must be >= 1 and >= batch "
                                     f"({scalars['batch']})")
                if evaluation.get("ability_every", 0) >= sequence:
                    raise StudyError(f"{where}: ability_every {evaluation['ability_every']} measures within a chunk "
                                     f"of T = {sequence} edits: give it below every sequence length")
                protocol: dict[str, Any] = {"sequence": sequence}
                if sequence > 1:
                    protocol.update(eval_timing=scalars["eval_timing"], batch=scalars["batch"])
                for editor in lists["editor"]:
                    cls = EDITORS[editor]
                    own = editors_cfg.get(editor) or {}
                    at = f"{where}: editors.{editor}"
                    settings = _typed(cls.config_class, own.get("settings") or {}, f"{at}.settings")
                    if "seed" in settings:
                        raise StudyError(f"{at}.settings: seed is set by the seed axis (fixed.seed / axes.seed)")
                    try:
                        base = replace(cls.overtone_defaults,
                                       **_typed(OverToneConfig, own.get("overtone") or {}, f"{at}.overtone"))
                    except ValueError as exc:
                        raise StudyError(f"{at}.overtone: {exc}") from exc
                    by_objective = _mapping(own.get("objective_settings"), f"{at}.objective_settings")
                    bad = set(by_objective) - set(OBJECTIVES)
                    if bad:
                        raise StudyError(f"{at}.objective_settings: keys are objectives ({', '.join(OBJECTIVES)})")
                    variants = _variants(lists["variant"], editor, base, f"{where}: variant")
                    deterministic = "seed" not in {f.name for f in fields(cls.config_class)}
                    seeds = [coerce(s, int, f"{where}: seed") for s in lists["seed"]]
                    if deterministic and len(seeds) > 1:
                        note = (f"{editor} has no random parts (no seed setting): it runs once, with seed "
                                f"{seeds[0]}, instead of once per seed {', '.join(map(str, seeds))}")
                        if note not in notes:
                            notes.append(note)
                        seeds = seeds[:1]
                    for variant in variants:
                        for seed in seeds:
                            merged = {**settings,
                                      **_typed(cls.config_class, by_objective.get(variant.objective) or {},
                                               f"{at}.objective_settings.{variant.objective}"),
                                      **variant.editor_settings}
                            if not deterministic:
                                merged["seed"] = seed
                            try:
                                resolved = asdict(cls.config_class(**merged))
                            except (TypeError, ValueError) as exc:
                                raise StudyError(f"{at} ({variant.label}): {exc}") from exc
                            after = None
                            if variant.match_steps:
                                after = by_key.get((model, dataset, sequence, editor, seed, variant.match_steps))
                                if after is None:
                                    raise StudyError(f"{where}: {variant.label} needs row {variant.match_steps!r}")
                            material = {
                                "overtone_version": __version__, "model": asdict(model), "dataset": identity,
                                "protocol": protocol, "editor": {"name": editor, **resolved},
                                "objective": make_objective(variant.objective, variant.overtone).config(),
                                "seed": seed, "matched_steps": after, "generation": generation,
                                **evaluation,
                                **({"stream": StreamSettings(**dict(stream)).describe()}
                                   if stream is not None else {}),
                            }
                            side_by_side = parallel if sequence == 1 and cls.parallel_refusal is None else 1
                            cell = Cell(cell_id(material), model, editor, variant, _hashable(merged), dataset,
                                        scalars["offset"], limit, sequence, scalars["eval_timing"],
                                        scalars["batch"], seed, given_generation, after, deterministic,
                                        values["evaluation"], values["eval_context"],
                                        bool(evaluation.get("ability")), evaluation.get("ability_every", 0),
                                        side_by_side, stream, eval_cache)
                            by_key[(model, dataset, sequence, editor, seed, variant.slug)] = cell.id
                            cells.append(cell)
    ids = [c.id for c in cells]
    duplicate = next((c for c in cells if ids.count(c.id) > 1), None)
    if duplicate is not None:
        raise StudyError(f"{where}: two cells have the same settings ({duplicate.name}); remove the repeated row")
    if any(full_overtone(c.variant) for c in cells) and not any(c.variant.objective == "ce" for c in cells):
        notes.append("no CE row: tables will have no paired OverTone - CE differences")
    return Study(name=str(spec.get("name") or Path(where).stem), description=str(spec.get("description") or ""),
                 spec=spec, cells=cells, threads=scalars["threads"], notes=notes)
