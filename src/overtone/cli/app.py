"""The typer application; command modules attach their commands to it."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Knowledge editing with the OverTone objective.")


@app.callback()
def main() -> None:
    """overtone: knowledge editing of language models with the OverTone objective."""
