"""The manifest of an edit artifact: its fields and their types, a hash of itself, and reading it back.

Everything that can go wrong with a file refuses with ``ArtifactError``, which names the folder, the
file and the field. The manifest's own hash (``manifest_sha256``, over a canonical serialisation of
every other field) detects damage and later changes; it is not a signature: a folder rewritten with
fresh hashes is read as a new artifact, whose tensors, base model and files are checked all the same.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "overtone-edit"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20  # far above any manifest written (LoRA's: 48 kB on the embedded model)
SHA_FIELD = "manifest_sha256"


class ArtifactError(ValueError):
    """A folder is not a readable edit artifact, does not match its manifest, or cannot be written.

    ``file`` and ``field`` name what was refused (when the problem lies in one), for callers that sort
    refusals; the message always names them too.
    """

    def __init__(self, message: str, file: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.file, self.field = file, field


def refuse(folder: Path, file: str | None, field: str | None, problem: str) -> ArtifactError:
    """The error for ``problem`` with ``field`` of ``file`` in artifact ``folder``, in one line."""
    where = f"{folder / file}" if file else f"{folder}"
    return ArtifactError(f"{where}: {f'field {field}: ' if field else ''}{problem}", file=file, field=field)


def canonical(value: Any) -> bytes:
    """One serialisation per JSON value: sorted keys, no spaces, UTF-8 (whitespace and key order never count)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def manifest_sha256(manifest: Mapping[str, Any]) -> str:
    """The hash a manifest records of itself: over every field but ``manifest_sha256``."""
    return hashlib.sha256(canonical({k: v for k, v in manifest.items() if k != SHA_FIELD})).hexdigest()


def sealed(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` as JSON reads it back, with its own hash added: what ``save_edit`` writes."""
    plain = json.loads(json.dumps(manifest, default=str))
    return {**plain, SHA_FIELD: manifest_sha256(plain)}


# ---- the fields and their types ------------------------------------------------------------------------


class _Wrong(Exception):
    """A field of the manifest is missing or of the wrong type (turned into ``ArtifactError`` by ``check``)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field = field


Check = Callable[[Any, str], None]


def _kind(value: Any) -> str:
    return "null" if value is None else {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
                                         list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _of(*types: type, label: str) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise _Wrong(where, f"expected {label}, found {_kind(value)}")

    return check


TEXT, WHOLE, NUMBER = _of(str, label="a string"), _of(int, label="an integer"), _of(int, float, label="a number")
FLAG, OBJECT, LIST = _of(bool, label="a boolean"), _of(dict, label="an object"), _of(list, label="a list")


def _hex64(value: Any, where: str) -> None:
    TEXT(value, where)
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise _Wrong(where, f"expected a sha256 (64 hex digits), found {value[:80]!r}")


def _count(value: Any, where: str) -> None:
    WHOLE(value, where)
    if value < 0:
        raise _Wrong(where, f"expected a count (>= 0), found {value}")


def _shape(value: Any, where: str) -> None:
    LIST(value, where)
    for i, size in enumerate(value):
        _count(size, f"{where}[{i}]")


def optional(check: Check) -> Check:
    def maybe(value: Any, where: str) -> None:
        if value is not None:
            check(value, where)

    return maybe


def each(check: Check) -> Check:
    """An object whose every value passes ``check`` (keys: any names), or a list whose every item does."""

    def all_of(value: Any, where: str) -> None:
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
        if items is None:
            raise _Wrong(where, f"expected an object or list, found {_kind(value)}")
        for key, item in items:
            check(item, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}")

    return all_of


@dataclass(frozen=True)
class Record:
    """An object with ``required`` and ``optional`` fields; ``closed``: no other field."""

    required: dict[str, Check]
    optional: dict[str, Check] = field(default_factory=dict)
    closed: bool = True

    def __call__(self, value: Any, where: str) -> None:
        OBJECT(value, where)
        prefix = f"{where}." if where else ""
        for name, check in self.required.items():
            if name not in value:
                raise _Wrong(f"{prefix}{name}", "missing")
            check(value[name], f"{prefix}{name}")
        for name, check in self.optional.items():
            if name in value:
                check(value[name], f"{prefix}{name}")
        if self.closed:
            extra = sorted(value.keys() - self.required.keys() - self.optional.keys())
            if extra:
                raise _Wrong(f"{prefix}{extra[0]}", "not a field of this format")


def listed(check: Check) -> Check:
    def items(value: Any, where: str) -> None:
        LIST(value, where)
        each(check)(value, where)

    return items


def mapping(check: Check) -> Check:
    def values(value: Any, where: str) -> None:
        OBJECT(value, where)
        each(check)(value, where)

    return values


TENSOR = Record({"shape": _shape, "dtype": TEXT, "sha256": _hex64})
SUMMARY = Record({}, {m: optional(NUMBER) for m in ("rel", "gen", "por", "loc")}, closed=False)
SCHEMA = Record({
    "format": TEXT,
    "format_version": WHOLE,
    "overtone_version": TEXT,
    "created": TEXT,
    "model": Record({
        "name": TEXT,
        "identity": Record({}, {"name": TEXT, "dtype": TEXT, "path": TEXT, "gguf_sha256": _hex64}, closed=False),
        "model_type": TEXT,
        "dtype": TEXT,
        "config_sha256": _hex64,
        "config": OBJECT,
        "tensors": mapping(TENSOR),
    }),
    "editor": Record({"name": TEXT}, closed=False),
    "objective": optional(Record({"name": TEXT}, closed=False)),
    "protocol": OBJECT,
    "edit": Record({"state": OBJECT, "tensors": mapping(TENSOR)}),
    "facts": listed(OBJECT),
    "metrics": optional(Record({}, {"summary": SUMMARY}, closed=False)),
    "files": mapping(Record({"sha256": _hex64, "bytes": _count})),
    SHA_FIELD: _hex64,
})


def check_fields(folder: Path, manifest: Any, check: Check = SCHEMA, where: str = "") -> None:
    """Refuse ``manifest`` (or its part at ``where``) unless it passes ``check``, naming the first wrong field."""
    try:
        check(manifest, where)
    except _Wrong as wrong:
        raise refuse(folder, MANIFEST, wrong.field or "(the manifest)", str(wrong)) from None


# ---- reading -------------------------------------------------------------------------------------------


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object that names no field twice (which of two values counts would be a guess)."""
    keys = [k for k, _ in pairs]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice is not None:
        raise ValueError(f"field {twice!r} appears twice")
    return dict(pairs)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of the artifact ``folder``: well-formed, of a format version this code reads, every field
    of its type (``check_seal`` then compares it with the hash it records of itself)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder}: not an edit artifact (no {MANIFEST}); `overtone edit --save DIR` writes one",
                            file=MANIFEST)
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise refuse(folder, MANIFEST, None, f"{size} bytes; a manifest is at most {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_unique)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise refuse(folder, MANIFEST, None, f"not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise refuse(folder, MANIFEST, "format", f"not an {FORMAT} manifest")
    version = manifest.get("format_version")
    if version == 1:
        raise refuse(folder, MANIFEST, "format_version",
                     f"format version 1 (overtone {manifest.get('overtone_version')}) records no hashes of its files, "
                     "so it cannot be verified; edit the facts again and save with `overtone edit --save` "
                     "(manifest.json holds the facts and the settings)")
    if not isinstance(version, int) or isinstance(version, bool) or version != FORMAT_VERSION:
        from overtone.version import __version__

        raise refuse(folder, MANIFEST, "format_version",
                     f"format version {version!r}, written by overtone {manifest.get('overtone_version')!r}; this "
                     f"overtone ({__version__}) reads version {FORMAT_VERSION}")
    check_fields(folder, manifest)
    return manifest


def check_seal(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse a manifest that differs from the hash it records of itself (after the checks that name a field)."""
    if manifest[SHA_FIELD] != manifest_sha256(manifest):
        raise refuse(folder, MANIFEST, SHA_FIELD, "does not match the manifest's contents: the manifest was changed "
                                                  "or damaged after it was saved")
