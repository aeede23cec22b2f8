"""A run's output directory: resolved config, one JSONL line per case, and a summary.

``config.yaml`` is written when the run starts. Every finished case is appended to ``cases.jsonl``
and flushed to disk at once, so a crash loses at most the case in flight; a restart on the same
directory skips the cases already written. A restart with a different configuration is refused,
because mixing two settings in one table would be silently wrong.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
CASES_FILE = "cases.jsonl"
SUMMARY_FILE = "summary.json"
# Settings that may differ between a run and its restart without changing results (``parallel``: cases
# edited at once, equivalent to one at a time up to floating-point summation order).
VOLATILE_KEYS = ("threads", "limit", "progress", "parallel")


class StoreError(RuntimeError):
    """The output directory cannot hold this run."""


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in VOLATILE_KEYS}


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


class ResultStore:
    """Append-only storage of per-case results for one run configuration."""

    def __init__(self, directory: Path | str, config: dict[str, Any]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = json.loads(json.dumps(config))  # normalise tuples etc. to what YAML round-trips
        config_path = self.dir / CONFIG_FILE
        if config_path.exists():
            old = yaml.safe_load(config_path.read_text()) or {}
            diff = _differences(_comparable(old), _comparable(self.config))
            if diff:
                raise StoreError(
                    f"{self.dir} holds a run with another configuration ({'; '.join(diff)}); "
                    "use another --out directory"
                )
        config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.records = self._read_cases()

    def _read_cases(self) -> list[dict[str, Any]]:
        path = self.dir / CASES_FILE
        if not path.exists():
            return []
        records: list[dict[str, Any]] = []
        good_bytes = 0
        with open(path, "rb") as fh:
            for line in fh:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("%s: dropping a partial last line left by an interrupted run", path)
                    break
                good_bytes += len(line)
        if good_bytes != path.stat().st_size:
            with open(path, "r+b") as fh:
                fh.truncate(good_bytes)
        return records

    @property
    def done(self) -> set[str]:
        return {r["case_id"] for r in self.records}

    def append(self, record: dict[str, Any]) -> None:
        self.append_many([record])

    def append_many(self, records: list[dict[str, Any]]) -> None:
        """Append records in one write and sync, so a continual-editing chunk lands on disk together."""
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.dir / CASES_FILE, "a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        self.records.extend(records)

    def write_summary(self, summary: dict[str, Any]) -> None:
        tmp = self.dir / (SUMMARY_FILE + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(self.dir / SUMMARY_FILE)


def read_run(directory: Path | str) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
    """(config, case records, summary or None) of a finished or partial run directory."""
    d = Path(directory)
    if not (d / CONFIG_FILE).exists():
        raise StoreError(f"{d} is not a run directory (no {CONFIG_FILE})")
    config = yaml.safe_load((d / CONFIG_FILE).read_text())
    cases = []
    if (d / CASES_FILE).exists():
        for line in (d / CASES_FILE).read_text(encoding="utf-8").splitlines():
            try:
                cases.append(json.loads(line))
            except json.JSONDecodeError:
                break
    summary = json.loads((d / SUMMARY_FILE).read_text()) if (d / SUMMARY_FILE).exists() else None
    return config, cases, summary
