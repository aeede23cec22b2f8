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
