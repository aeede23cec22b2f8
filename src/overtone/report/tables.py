"""Result tables in the paper's layout (x100): one table per dataset and protocol, a row per run.

Columns follow the paper's Table 4.2 and App. C: Rel. Gen. Por. Loc. Avg. for the teacher-forced
benchmarks, Rel. Sng-Hop Mlt-Hop Avg. for MQuAKE. A column is shown only when some run of the table
has a value for it, so WikiBio (no rephrases, no portability) gets Rel. Loc. Avg., as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

COLUMNS = (("rel", "Rel."), ("gen", "Gen."), ("por", "Por."), ("loc", "Loc."), ("sng_hop", "Sng-Hop"),
           ("mlt_hop", "Mlt-Hop"), ("avg", "Avg."))
TAIL = ("cases", "steps", "s/edit")

Row = tuple[str, dict[str, Any]]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def metric_columns(summaries: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """The (key, header) metric columns with a value in at least one summary; Avg. always."""
    return [(k, h) for k, h in COLUMNS if k == "avg" or any(s.get(k) is not None for s in summaries)]


def headers(columns: Sequence[tuple[str, str]]) -> list[str]:
    return ["run", *(h for _, h in columns), *TAIL]


def row_cells(label: str, summary: dict[str, Any], columns: Sequence[tuple[str, str]] | None = None) -> list[str]:
    """Label, the metrics, number of cases, mean optimiser steps and seconds per edit (with eval)."""
    columns = metric_columns([summary]) if columns is None else columns
    seconds = (summary.get("mean_edit_s") or 0) + (summary.get("mean_eval_s") or 0)
    return [
        label,
        *(_fmt(summary.get(key)) for key, _ in columns),
        str(summary.get("n_cases", "")),
        _fmt(summary.get("mean_steps"), 1),
        _fmt(seconds, 2),
    ]


def summary_table(rows: Sequence[Row], title: str | None = None, caption: str | None = None) -> Table:
    columns = metric_columns([s for _, s in rows])
    table = Table(title=title, caption=caption)
    for i, header in enumerate(headers(columns)):
        table.add_column(header, justify="left" if i == 0 else "right", style="bold" if i == 0 else None,
                         no_wrap=i == 0)
    for label, summary in rows:
        table.add_row(*row_cells(label, summary, columns))
    return table


def markdown_table(rows: Sequence[Row]) -> str:
    """The same table as GitHub Markdown, for READMEs and issue notes."""
    columns = metric_columns([s for _, s in rows])
    names = headers(columns)
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(row_cells(label, s, columns)) + " |" for label, s in rows]
    return "\n".join(lines)


def protocol_title(config: dict[str, Any]) -> str:
    """E.g. ``zsre, single editing`` or ``wikibio, continual T=10`` (from a run's config)."""
    dataset = (config.get("dataset") or {}).get("name", "?")
    sequence = config.get("sequence", 1)
    if sequence == 1:
        return f"{dataset}, single editing"
    timing = ", evaluated after each edit" if config.get("eval_timing") == "after-each" else ""
    return f"{dataset}, continual T={sequence}{timing}"


def dataset_tables(runs: Sequence[tuple[str, dict[str, Any], dict[str, Any]]]) -> list[tuple[str, list[Row]]]:
    """Runs given as (label, config, summary), grouped into one table per dataset and protocol, in input order."""
    groups: dict[str, list[Row]] = {}
    for label, config, summary in runs:
        groups.setdefault(protocol_title(config), []).append((label, summary))
    return list(groups.items())
