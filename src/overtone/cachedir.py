"""The user's cache directory, and the content-addressed entries of the unedited model's evaluation in it.

``cache_root()`` is ``$OVERTONE_CACHE``, else ``$XDG_CACHE_HOME/overtone``, else ``~/.cache/overtone``; the
converted embedded model, the second-moment statistics and the evaluation entries live under it.

An evaluation entry (``EntryStore``, under ``eval/``, or ``$OVERTONE_EVAL_CACHE``) is one JSON file named by
the sha256 of its key, in a folder per model (the first 16 hex digits of the model's identity hash, with a
``model.json`` naming it). The
file carries its key, its value and a sha256 of both: an entry that does not parse, whose checksum or key does
not match, or whose value the caller refuses is not trusted; it is recomputed and overwritten, with a warning.
Every file is written to a temporary file in its folder and renamed over the old one (atomic), so concurrent
writers (two runs, a study's workers) never leave a partial entry; two writers of one key write the same bytes.

This module imports no torch, so ``overtone cache info|clear`` start fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
ENTRY_FORMAT = 1  # the layout of an entry file (not of what it holds: that is the key's ``eval_code``)
MODEL_FILE = "model.json"


def cache_root() -> Path:
    """``$OVERTONE_CACHE``, else ``$XDG_CACHE_HOME/overtone``, else ``~/.cache/overtone``."""
    if os.environ.get("OVERTONE_CACHE"):
        return Path(os.environ["OVERTONE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "overtone"


def eval_root() -> Path:
    """Where the evaluation entries live: ``$OVERTONE_EVAL_CACHE``, else ``eval/`` under the cache root."""
    if os.environ.get("OVERTONE_EVAL_CACHE"):
        return Path(os.environ["OVERTONE_EVAL_CACHE"])
    return cache_root() / EVAL_DIR


def canonical(data: Any) -> str:
    """The one JSON text of ``data`` that keys and checksums are computed from."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in its folder and a rename: readers see the old file or
    the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class ModelEntries:
    """The entries of one model: its folder, what ``model.json`` says of it, how many and their size."""

    folder: Path
    model: dict[str, Any]
    entries: int
    size: int

    @property
    def name(self) -> str:
        return str(self.model.get("name", "?"))


class EntryStore:
    """Content-addressed JSON entries under ``root`` (default: ``eval_root()``); see the module docstring.

    A key is a JSON-serialisable mapping with ``model`` = {"name", "sha256", ...} (the model's identity); its
    file is ``<root>/<model sha256[:16]>/<sha256 of the key>.json``.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else eval_root()

    def path(self, key: dict[str, Any]) -> Path:
        return self.root / key["model"]["sha256"][:16] / f"{_sha256(canonical(key))}.json"

    def read(self, key: dict[str, Any], check: Callable[[Any], bool] = lambda _: True) -> Any | None:
        """The value stored under ``key``; None when there is none, or when the entry is damaged, truncated, holds
        another key or a value ``check`` refuses (then with a warning: the caller recomputes and overwrites it)."""
        path = self.path(key)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("evaluation cache: cannot read %s (%s); recomputing it", path, exc)
            return None
        problem = self._problem(text, key, check)
        if problem is not None:
            log.warning("evaluation cache: entry %s %s; recomputing it", path, problem)
            return None
        return json.loads(text)["value"]

    @staticmethod
    def _problem(text: str, key: dict[str, Any], check: Callable[[Any], bool]) -> str | None:
        """Why the entry ``text`` cannot be trusted for ``key``, or None."""
        try:
            entry = json.loads(text)
        except ValueError:
            return "is not valid JSON (damaged or truncated)"
        if not isinstance(entry, dict) or entry.get("format") != ENTRY_FORMAT or not {"key", "value"} <= entry.keys():
            return "is not an evaluation entry of this format"
        if entry.get("sha256") != _sha256(canonical({"key": entry["key"], "value": entry["value"]})):
            return "does not match its checksum (damaged)"
        if entry["key"] != json.loads(canonical(key)):
            return "holds another key"
        try:
            accepted = check(entry["value"])
        except (TypeError, ValueError, KeyError, IndexError):
            accepted = False
        return None if accepted else "holds a value of the wrong shape"

    def write(self, key: dict[str, Any], value: Any) -> None:
        """Store ``value`` under ``key`` (replacing any entry there), atomically; the model's folder gets its
        ``model.json`` the first time."""
        path = self.path(key)
        about = path.parent / MODEL_FILE
        if not about.is_file():
            _atomic_write(about, canonical(key["model"]) + "\n")
        body = {"key": key, "value": value}
        _atomic_write(path, canonical({"format": ENTRY_FORMAT, **body, "sha256": _sha256(canonical(body))}) + "\n")

    def models(self) -> list[ModelEntries]:
        """Every model folder under the root, with its entry count and size (bytes of all its files)."""
        out = []
        for folder in sorted(p for p in self.root.glob("*") if p.is_dir()):
            try:
                model = json.loads((folder / MODEL_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                model = {}
            files = [p for p in folder.iterdir() if p.is_file()]
            out.append(ModelEntries(folder, model if isinstance(model, dict) else {},
                                    sum(p.suffix == ".json" and p.name != MODEL_FILE for p in files),
                                    sum(p.stat().st_size for p in files)))
        return out

    def clear(self, model: str | None = None) -> list[ModelEntries]:
        """Remove the entries of every model, or of the models named ``model`` (a model name, or the start of
        an identity hash); the models removed."""
        chosen = [m for m in self.models() if model is None or m.name == model
                  or str(m.model.get("sha256", m.folder.name)).startswith(model)]
        for entries in chosen:
            shutil.rmtree(entries.folder, ignore_errors=True)
        return chosen
