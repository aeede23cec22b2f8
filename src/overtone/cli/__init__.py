"""The ``overtone`` command line: a thin layer over the Python API.

    overtone bench --editor ft-m --objective overtone --dataset zsre --limit 50 --out runs/ftm-ot
    overtone demo  --limit 40                       # CE vs OverTone side by side
    overtone table runs/ftm-ce runs/ftm-ot          # tables from run directories
    overtone datasets                               # named benchmarks and readable file formats
    overtone edit  --prompt "The Eiffel Tower is in" --target "Rome" --locality "The capital of Japan is"
    overtone edit  --facts my_facts.jsonl --save edits/mine    # a file of facts, saved as an edit artifact
    overtone apply edits/mine                       # check, re-measure and revert a saved edit
    overtone export edits/mine --out models/edited  # a Hugging Face folder with the edit merged
    overtone generate --edit edits/mine --prompt "..."  # chat with the edited model
    overtone trace --limit 1 --out runs/trace       # per-token UD and probe losses, CE vs OverTone
    overtone report runs/ --out report              # one self-contained HTML page + Markdown
    overtone stats                                  # second moments of MLP keys for ROME/MEMIT (cached)
    overtone cache info                             # the cached evaluation of unedited models (clear: remove)
    overtone study run studies/paper-table-4-2.yaml --out runs/t42 --executor ray   # a grid of runs

Each command group is a module here that attaches its commands to ``app``; adding one is a new module
plus one import line below.
"""

from overtone.cli import (  # noqa: F401  (registers the commands)
    artifacts,
    bench,
    cache,
    compare,
    datasets,
    edit,
    report,
    stats,
    study,
    trace,
)
from overtone.cli.app import app

__all__ = ["app"]
