"""Result tables in the paper's layout (Rel. Gen. Por. Loc. Avg., x100)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

COLUMNS = (("rel", "Rel."), ("gen", "Gen."), ("por", "Por."), ("loc", "Loc."), ("avg", "Avg."))
HEADERS = ("run", *(h for _, h in COLUMNS), "cases", "steps", "s/edit")


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def row_cells(label: str, summary: dict[str, Any]) -> list[str]:
    """Label, the five metrics, number of cases, mean optimiser steps and seconds per edit (with eval)."""
    seconds = (summary.get("mean_edit_s") or 0) + (summary.get("mean_eval_s") or 0)
    return [
        label,
        *(_fmt(summary.get(key)) for key, _ in COLUMNS),
        str(summary.get("n_cases", "")),
        _fmt(summary.get("mean_steps"), 1),
        _fmt(seconds, 2),
    ]


def summary_table(
    rows: Sequence[tuple[str, dict[str, Any]]], title: str | None = None, caption: str | None = None
) -> Table:
    table = Table(title=title, caption=caption)
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if i == 0 else "right", style="bold" if i == 0 else None,
                         no_wrap=i == 0)
    for label, summary in rows:
        table.add_row(*row_cells(label, summary))
    return table


def markdown_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """The same table as GitHub Markdown, for READMEs and issue notes."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row_cells(label, s)) + " |" for label, s in rows]
    return "\n".join(lines)


def _paired_rows(results: Sequence[tuple[str, dict[str, Any], Sequence[dict[str, Any]]]], base: int):
    from overtone.report.stats import paired_differences

    _, _, base_records = results[base]
    for i, (label, _summary, records) in enumerate(results):
        if i == base:
            continue
        diffs = paired_differences(base_records, records)
        avg = diffs["avg"]
        cells = [str(diffs[key]) + ("*" if diffs[key].significant else "") for key, _ in COLUMNS]
        yield [label, *cells, f"{avg.wins}/{avg.ties}/{avg.losses}", str(avg.n)]


PAIRED_HEADERS = ("run", *(f"Δ{h}" for _, h in COLUMNS), "W/T/L (Avg.)", "paired cases")


def paired_table(
    results: Sequence[tuple[str, dict[str, Any], Sequence[dict[str, Any]]]], base: int = 0, title: str | None = None
) -> Table:
    """Per-case paired differences to ``results[base]``: mean ± 95% half-width (* = beyond noise), x100."""
    table = Table(title=title, caption="Δ = mean per-case difference to the base row ± 95% t-interval; * = "
                                       "interval excludes 0; W/T/L = cases won/tied/lost on Avg.")
    for i, header in enumerate(PAIRED_HEADERS):
        table.add_column(header, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in _paired_rows(results, base):
        table.add_row(*row)
    return table


def paired_markdown(results: Sequence[tuple[str, dict[str, Any], Sequence[dict[str, Any]]]], base: int = 0) -> str:
    lines = ["| " + " | ".join(PAIRED_HEADERS) + " |", "|" + "---|" * len(PAIRED_HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in _paired_rows(results, base)]
    return "\n".join(lines)
