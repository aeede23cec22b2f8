"""``overtone cache info|clear``: the evaluation cache of unedited models (evaluation/cache.py), shown or removed.

Imports no torch: the store is plain JSON files (``cachedir.EntryStore``).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from overtone.cachedir import EntryStore
from overtone.cli.app import app
from overtone.cli.common import console, fail

cache_app = typer.Typer(no_args_is_help=True, help="The cache of unedited models' evaluation (docs/performance.md).")
app.add_typer(cache_app, name="cache")


def _size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


@cache_app.command("info")
def info() -> None:
    """Where the evaluation cache is, and its entries and size per model."""
    store = EntryStore()
    models = store.models()
    console.print(f"evaluation cache: {store.root}", markup=False)
    if not models:
        console.print("no entries", markup=False)
        return
    table = Table("model", "identity", "dtype", "entries", "size")
    for entries in models:
        table.add_row(entries.name, str(entries.model.get("sha256", entries.folder.name))[:16],
                      str(entries.model.get("dtype", "?")), str(entries.entries), _size(entries.size))
    console.print(table)
    console.print(f"{sum(m.entries for m in models)} entries, {_size(sum(m.size for m in models))}", markup=False)


@cache_app.command("clear")
def clear(
    model: Annotated[str | None, typer.Option(
        "--model", help="only this model's entries: its name (as in cache info) or the start of its identity")] = None,
) -> None:
    """Remove the evaluation cache's entries (of one model with --model); runs recompute what they need."""
    if model is not None and not model.strip():
        fail("--model: give a model name or the start of its identity hash")
    removed = EntryStore().clear(model)
    if model is not None and not removed:
        fail(f"--model {model}: no entries of that model (overtone cache info lists them)")
    console.print(f"removed {sum(m.entries for m in removed)} entries of {len(removed)} model(s), "
                  f"{_size(sum(m.size for m in removed))}", markup=False)
