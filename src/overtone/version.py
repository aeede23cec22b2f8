"""Which code this is: the package version, and the git revision of a checkout.

A run records both (``code_identity``), because the version alone stays the same across many commits
that re-measure numbers; ``overtone table`` and ``report`` warn when they combine runs of different
code. This module imports nothing of the package, so every layer may use it.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

# Bumped whenever a change alters results (pyproject.toml reads it from here).
__version__ = "0.2.0"

NOT_GIT = "not a git checkout"


def _git(package: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_identity() -> dict[str, Any]:
    """``{"version", "revision", "dirty"}`` of the running package: the commit of the checkout it is imported
    from and whether its source differs from that commit (uncommitted or untracked files under the package);
    ``revision`` is ``NOT_GIT`` (and ``dirty`` None) for an installed copy or a tree without git."""
    package = Path(__file__).resolve().parent
    top = _git(package, "rev-parse", "--show-toplevel")
    revision = _git(package, "rev-parse", "HEAD") if top else None
    if not top or not revision:
        return {"version": __version__, "revision": NOT_GIT, "dirty": None}
    status = _git(package, "status", "--porcelain", "--", str(package))
    return {"version": __version__, "revision": revision, "dirty": bool(status) if status is not None else None}


def describe(identity: dict[str, Any] | None) -> str:
    """One short label for a recorded identity: ``0.2.0 @ 1a2b3c4d9e (dirty)``; runs older than these records
    give ``0.1.0 (revision not recorded)``."""
    if not identity:
        return "unknown code"
    revision = identity.get("revision")
    if revision is None:
        return f"{identity.get('version', '?')} (revision not recorded)"
    if revision == NOT_GIT:
        return f"{identity.get('version', '?')} ({NOT_GIT})"
    return f"{identity.get('version', '?')} @ {revision[:10]}{' (dirty)' if identity.get('dirty') else ''}"
