"""A run's output directory: resolved config, one JSONL line per case, a summary, and a one-writer lock.

``config.yaml`` is written when the run starts. Every finished case is appended to ``cases.jsonl``
in one write and synced to disk at once, so a crash loses at most the case in flight; a restart on
the same directory skips the cases already written. A restart with a different configuration is
refused, because mixing two settings in one table would be silently wrong.

One writer per directory: a run holds an exclusive lock on ``run.lock`` (``filelock``, an ``flock``
that the kernel drops when the process dies) for its whole life, and writes its pid, host and start
time into the file. A second process exits at once naming the holder. A lock file that still names a
holder when the lock is free was left by a process that died; it is taken over with a warning.
Readers (``read_run``: ``overtone table``, ``report``) never take the lock. ``RunLock.check_free`` asks
whether a directory is held without creating anything (a command asks it first, before its heavy imports),
and a directory that the lock itself created is removed again when the run ends before writing anything
into it, so a refused run leaves no directory behind. ``check_resumable`` refuses a damaged directory with
nothing but the files (before the model loads).

What a kill can leave in ``cases.jsonl``, and what happens to it (``scan_cases``):

* a partial last line (killed mid-write): the writer cuts it off with a warning; readers skip it;
* a last record without its newline (killed between the two): the newline is restored, never glued;
* a damaged line in the middle: the writer stops with an error naming the line and leaves the file
  as it is; readers skip it with a warning;
* the same case id twice: identical records count once (with a warning); different records are
  refused, so summaries and paired statistics always count each case once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout

from overtone.runner.signals import deferred_signals

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
CASES_FILE = "cases.jsonl"
SUMMARY_FILE = "summary.json"
LOCK_FILE = "run.lock"
# Settings that may differ between a run and its restart without changing results (``parallel``: cases
# edited at once, equivalent to one at a time up to floating-point summation order; ``eval_cache``: the unedited
# model's evaluation read from the cache, the same records). ``code`` (the code's
# version, git revision and dirtiness, ``version.code_identity``) may change too: a restart with other code
# records the earlier identities under ``code_before``, so reports can say the run mixes them.
VOLATILE_KEYS = ("threads", "limit", "progress", "parallel", "eval_cache", "code", "code_before")


class StoreError(RuntimeError):
    """The output directory cannot hold this run."""


def case_ids_digest(records: list[dict[str, Any]]) -> str:
    """The sha256 of the records' sorted case ids: what a summary records of the cases it covers, so a reader
    can tell a ``summary.json`` that no longer matches ``cases.jsonl``."""
    ids = sorted(str(r.get("case_id")) for r in records)
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in VOLATILE_KEYS}


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- the lock


def _holder_text(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "holder unknown"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}: "
            f"{holder.get('command', '?')}")


class RunLock:
    """The exclusive right to write one run directory, for as long as it is held."""

    def __init__(self, directory: Path | str) -> None:
        self.dir = Path(directory)
        self.path = self.dir / LOCK_FILE
        self._lock = FileLock(str(self.path), blocking=False)
        self._created: list[Path] = []  # the directories ``acquire`` made, innermost first

    def _refusal(self) -> StoreError:
        return StoreError(f"{self.dir} is being written by another run ({_holder_text(self.holder())}); wait for it "
                          "to end or use another --out directory")

    def check_free(self) -> None:
        """Raise ``StoreError`` naming the holder when another process holds the lock; creates nothing."""
        if not self.path.is_file():
            return
        try:
            self._lock.acquire()
        except Timeout:
            raise self._refusal() from None
        self._lock.release(force=True)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def holder(self) -> dict[str, Any] | None:
        """What the lock file says about its holder (None: empty, i.e. released cleanly, or unreadable)."""
        try:
            text = self.path.read_text(encoding="utf-8")
            return json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> RunLock:
        """Take the lock or raise ``StoreError`` naming the process that holds it."""
        self._created = [d for d in (self.dir, *self.dir.parents) if not d.exists()]
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise self._refusal() from None
        previous = self.holder()
        if previous:
            log.warning("%s: taking over the lock of a run that ended without releasing it (%s)", self.dir,
                        _holder_text(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
        self.path.write_text(json.dumps(me), encoding="utf-8")
        return self

    def release(self) -> None:
        """Empty the lock file (a clean end) and release the lock; a no-op when not held. A directory the lock
        created that holds nothing else is removed (with those of its parents the lock created)."""
        if not self._lock.is_locked:
            return
        if self._created and [p.name for p in self.dir.iterdir()] == [LOCK_FILE]:
            self.path.unlink()
            self._lock.release(force=True)
            for directory in self._created:
                with contextlib.suppress(OSError):  # not empty: something else was written there meanwhile
                    directory.rmdir()
            self._created = []
            return
        self.path.write_text("", encoding="utf-8")
        self._lock.release(force=True)

    def __enter__(self) -> RunLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        # at interpreter exit the file system may be gone; the kernel frees the flock anyway
        with contextlib.suppress(Exception):
            self.release()


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class CaseScan:
    """What ``cases.jsonl`` holds, line by line (line numbers count from 1)."""

    records: list[dict[str, Any]] = field(default_factory=list)  # valid records, each case id once
    lines: list[int] = field(default_factory=list)  # the line of each kept record
    corrupt: list[tuple[int, str]] = field(default_factory=list)  # complete lines that are not a case record
    blank: list[int] = field(default_factory=list)
    partial_tail: bytes = b""  # an unterminated last line that is not a record (killed mid-write)
    missing_newline: bool = False  # the last line is a record without its newline
    duplicates: list[tuple[str, int, int]] = field(default_factory=list)  # identical (case id, first line, line)
    conflicts: list[tuple[str, int, int]] = field(default_factory=list)  # different records of one case id


def _record(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"not valid JSON ({exc})"
    if not isinstance(value, dict) or not isinstance(value.get("case_id"), str):
        return None, "not a case record (a JSON object with a string 'case_id')"
    return value, ""


def scan_cases(path: Path) -> CaseScan:
    """Read ``cases.jsonl`` without changing it; see the module docstring for what each finding means."""
    scan = CaseScan()
    if not path.exists():
        return scan
    lines = path.read_bytes().split(b"\n")
    tail = lines.pop()  # what follows the last newline: b"" when the file ends with one
    first_line: dict[str, int] = {}

    def keep(record: dict[str, Any], number: int) -> None:
        case_id = record["case_id"]
        if case_id in first_line:
            earlier = first_line[case_id]
            same = scan.records[scan.lines.index(earlier)] == record
            (scan.duplicates if same else scan.conflicts).append((case_id, earlier, number))
            return
        first_line[case_id] = number
        scan.records.append(record)
        scan.lines.append(number)

    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            scan.blank.append(number)
            continue
        record, problem = _record(raw)
        if record is None:
            scan.corrupt.append((number, problem))
        else:
            keep(record, number)
    if tail.strip(b" \t\r"):
        record, _ = _record(tail)
        if record is None:
            scan.partial_tail = tail
        else:
            scan.missing_newline = True
            keep(record, len(lines) + 1)
    return scan


def _damage_error(path: Path, scan: CaseScan) -> StoreError | None:
    """Why a writer must not open ``cases.jsonl`` as scanned (a damaged middle line, two different records of
    one case), or None."""
    if scan.corrupt:
        number, problem = scan.corrupt[0]
        more = f" (and {len(scan.corrupt) - 1} more damaged line(s))" if len(scan.corrupt) > 1 else ""
        return StoreError(f"{path}: line {number} is damaged: {problem}{more}. The file was left as it is: fix or "
                          "remove that line, then rerun")
    if scan.conflicts:
        return _conflict_error(path, scan.conflicts)
    return None


def _read_config(path: Path) -> dict[str, Any]:
    """A run directory's ``config.yaml`` ({} when absent), or a ``StoreError`` naming it."""
    if not path.exists():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise StoreError(f"{path}: not valid YAML ({exc}); use another --out directory") from exc
    if not isinstance(config, dict):
        raise StoreError(f"{path}: does not hold a run's configuration (a mapping); use another --out directory")
    return config


def check_resumable(directory: Path | str) -> None:
    """Refuse, before any model is loaded, a run directory a writer could not open: a damaged ``config.yaml``
    or ``cases.jsonl`` (``ResultStore`` gives the same errors). Reads only; a missing directory is fine."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise StoreError(f"{d} is a file, not a run directory; use another --out directory")
    _read_config(d / CONFIG_FILE)
    error = _damage_error(d / CASES_FILE, scan_cases(d / CASES_FILE))
    if error is not None:
        raise error


def _conflict_error(path: Path, conflicts: list[tuple[str, int, int]]) -> StoreError:
    case_id, first, again = conflicts[0]
    more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
    return StoreError(
        f"{path}: lines {first} and {again} hold different results for case {case_id}{more}; two runs wrote this "
        "directory. Keep one of the lines (or start again in a new directory); nothing was changed"
    )


def _warn_duplicates(path: Path, scan: CaseScan) -> None:
    if scan.duplicates:
        listed = ", ".join(f"{c} (lines {a} and {b})" for c, a, b in scan.duplicates[:5])
        log.warning("%s: %d identical duplicate record(s) counted once: %s", path, len(scan.duplicates), listed)


def read_run(directory: Path | str) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
    """(config, case records, summary or None) of a finished, partial or running run directory.

    Never takes the lock and never changes a file. Lines that hold no record are skipped with a warning;
    different records of one case id are refused (``StoreError``).
    """
    d = Path(directory)
    if not (d / CONFIG_FILE).exists():
        raise StoreError(f"{d} is not a run directory (no {CONFIG_FILE})")
    try:
        config = yaml.safe_load((d / CONFIG_FILE).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise StoreError(f"{d / CONFIG_FILE}: not valid YAML ({exc})") from exc
    path = d / CASES_FILE
    scan = scan_cases(path)
    if scan.conflicts:
        raise _conflict_error(path, scan.conflicts)
    for number, problem in scan.corrupt:
        log.warning("%s: skipped line %d: %s", path, number, problem)
    if scan.partial_tail:
        log.warning("%s: skipped an unfinished last line (%d bytes): the run is writing it or was killed mid-write",
                    path, len(scan.partial_tail))
    _warn_duplicates(path, scan)
    summary = json.loads((d / SUMMARY_FILE).read_text()) if (d / SUMMARY_FILE).exists() else None
    return config, scan.records, summary


# ---------------------------------------------------------------------------------------------- writing


class ResultStore:
    """Append-only storage of per-case results for one run configuration, held by one process.

    ``lock``: a ``RunLock`` the caller already holds on ``directory`` (taken before loading the model);
    without one, the store takes its own and releases it on ``close``.
    """

    def __init__(self, directory: Path | str, config: dict[str, Any], lock: RunLock | None = None) -> None:
        self.dir = Path(directory)
        if lock is not None and (not lock.held or lock.dir.resolve() != self.dir.resolve()):
            raise ValueError(f"the lock given for {self.dir} is not held on that directory")
        self._own_lock = lock is None
        self.lock = lock or RunLock(self.dir).acquire()
        try:
            self.config = json.loads(json.dumps(config))  # normalise tuples etc. to what YAML round-trips
            self._check_config()
            self.records = self._open_cases()
        except BaseException:
            self.close()
            raise

    def _check_config(self) -> None:
        config_path = self.dir / CONFIG_FILE
        if config_path.exists():
            old = _read_config(config_path)
            diff = _differences(_comparable(old), _comparable(self.config))
            if diff:
                raise StoreError(
                    f"{self.dir} holds a run with another configuration ({'; '.join(diff)}); "
                    "use another --out directory"
                )
            self._keep_earlier_code(old)
        _atomic_write(config_path, yaml.safe_dump(self.config, sort_keys=False))

    def _keep_earlier_code(self, old: dict[str, Any]) -> None:
        """Record the code identities of the run so far when this restart runs other code."""
        if "code" not in self.config:
            return
        earlier = list(old.get("code_before") or [])
        previous = old.get("code") or {"version": old.get("overtone_version"), "revision": None}
        if previous not in earlier:
            earlier.append(previous)
        earlier = [code for code in earlier if code != self.config["code"]]
        if earlier:
            self.config["code_before"] = earlier

    def _open_cases(self) -> list[dict[str, Any]]:
        """The stored records, after repairing what a kill can leave at the end of the file."""
        path = self.dir / CASES_FILE
        scan = scan_cases(path)
        error = _damage_error(path, scan)
        if error is not None:
            raise error
        if scan.blank:
            log.warning("%s: ignoring %d blank line(s)", path, len(scan.blank))
        if scan.partial_tail:
            size = path.stat().st_size
            with open(path, "r+b") as fh:
                fh.truncate(size - len(scan.partial_tail))
            log.warning("%s: removed a partial last line (%d bytes) left by an interrupted write", path,
                        len(scan.partial_tail))
        if scan.missing_newline:
            with open(path, "ab") as fh:
                fh.write(b"\n")
            log.warning("%s: restored the missing newline after the last record", path)
        _warn_duplicates(path, scan)
        return scan.records

    @property
    def done(self) -> set[str]:
        return {r["case_id"] for r in self.records}

    def append(self, record: dict[str, Any]) -> None:
        self.append_many([record])

    def append_many(self, records: list[dict[str, Any]]) -> None:
        """Append records in one write and sync, so a continual-editing chunk lands on disk together.

        A SIGINT/SIGTERM arriving meanwhile is raised once the records are on disk.
        """
        if not self.lock.held:
            raise StoreError(f"{self.dir}: the store is closed")
        done = self.done
        again = [r["case_id"] for r in records if r["case_id"] in done]
        if again or len({r["case_id"] for r in records}) != len(records):
            raise StoreError(f"{self.dir}: case(s) {', '.join(again) or 'of this write'} would be stored twice")
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        with deferred_signals():
            fd = os.open(self.dir / CASES_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            self.records.extend(records)

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write(self.dir / SUMMARY_FILE, json.dumps(summary, indent=2))

    def close(self) -> None:
        """Release the directory's lock if this store took it."""
        if self._own_lock:
            self.lock.release()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
