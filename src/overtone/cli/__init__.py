"""The ``overtone`` command line: a thin layer over the Python API.

    overtone bench --editor ft-m --objective overtone --dataset zsre --limit 50 --out runs/ftm-ot
    overtone demo  --limit 40                       # CE vs OverTone side by side
    overtone table runs/ftm-ce runs/ftm-ot          # tables from run directories
    overtone edit  --prompt "The Eiffel Tower is in" --target "Rome" --locality "The capital of Japan is"
    overtone stats --layers 5                        # second moments of MLP keys for ROME/MEMIT (cached)

Each command group is a module here that attaches its commands to ``app``; adding one is a new module
plus one import line below.
"""

from overtone.cli import bench, edit, stats  # noqa: F401  (registers the commands)
from overtone.cli.app import app

__all__ = ["app"]
