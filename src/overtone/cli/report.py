"""``overtone report``: one self-contained HTML page (and Markdown) from run directories and traces."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from overtone.cli.app import app
from overtone.cli.common import console, fail, setup
from overtone.cli.options import EvalOpt, VerboseOpt


@app.command()
def report(
    paths: Annotated[list[Path], typer.Argument(help="run directories, trace directories, or folders holding them")],
    out: Annotated[Path, typer.Option("--out", help="directory for report.html, report.md and figures/")] = Path(
        "report"),
    title: Annotated[str, typer.Option("--title", help="page title")] = "overtone report",
    evaluation: EvalOpt = "both",
    verbose: VerboseOpt = False,
) -> None:
    """Write one self-contained HTML page (and Markdown) with the paper's tables, Fig. 3 bars and trace plots."""
    from overtone.diagnostics import TraceError
    from overtone.report.page import write_report
    from overtone.report.runs import ReportError

    setup(1, verbose)
    try:
        protocols = ("teacher-forced", "wild") if evaluation == "both" else (evaluation,)
        files = write_report(paths, out, title, protocols)
    except (ReportError, TraceError) as exc:
        fail(str(exc))
    size = files.html.stat().st_size / 1024
    console.print(f"wrote {files.html} ({size:.0f} KiB, self-contained), {files.markdown} and "
                  f"{len(files.figures)} figure(s) in {files.html.parent / 'figures'}", markup=False)
