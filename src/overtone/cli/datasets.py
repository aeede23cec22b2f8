"""``overtone datasets``: the benchmarks shipped with the package and the file formats ``--dataset`` reads."""

from __future__ import annotations

from rich.table import Table

from overtone.cli.app import app
from overtone.cli.common import console


@app.command()
def datasets() -> None:
    """List the named benchmarks and the dataset file formats that --dataset accepts (detected from the fields)."""
    from overtone.benchmarks import BENCHMARKS, DATA_DIR, FORMATS

    names = Table(title="benchmarks (--dataset NAME)")
    for column in ("name", "format", "description"):
        names.add_column(column, style="bold" if column == "name" else None, no_wrap=column != "description")
    for bench in BENCHMARKS.values():
        names.add_row(bench.name, bench.format or "-", bench.description)
    console.print(names)
    formats = Table(title="dataset file formats (--dataset PATH)")
    for column in ("format", "evaluation", "recognised by"):
        formats.add_column(column, style="bold" if column == "format" else None, no_wrap=column == "format")
    for fmt in FORMATS.values():
        formats.add_row(fmt.name, fmt.evaluation, fmt.description)
    console.print(formats)
    console.print(f"origins and licences: {DATA_DIR / 'SOURCES.md'}", markup=False)
