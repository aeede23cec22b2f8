"""A study directory's tables: the paper's layout with bootstrap intervals, and paired differences to CE.

Built from whatever cells have records (a running or interrupted study included): rows are an
editor's variants (CE, OverTone, ablations, ...), column groups the datasets (or, with several
sequence lengths, the T of one dataset), cells the mean over seeds with the half-width of its 95%
interval (report/bootstrap.py). A cell marked * rests on part of the planned cases or seeds. The
paired tables give every row minus the CE row of the same editor, dataset and protocol (and each
matched-steps control against its source), with the interval, per metric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from overtone.report.bootstrap import Estimate, Records, paired_estimates, row_estimates
from overtone.report.stats import holm
from overtone.report.tables import (
    COLUMNS,
    DATASET_NAMES,
    EDITOR_NAMES,
    LIFELONG_COMPARISONS,
    LIFELONG_HEADERS,
    METRIC_HEADERS,
    PaperTable,
    _order,
    dataset_name,
    editor_name,
    lifelong_curve_table,
    lifelong_records,
    lifelong_table,
    retention_tables,
)
from overtone.runner.bench import summarize
from overtone.study.driver import cell_states, read_plan, read_records


@dataclass
class Row:
    """One setting over its seeds: the cells that differ only in the seed."""

    cells: list[dict[str, Any]]  # plan entries with their state
    records: dict[int, list[dict[str, Any]]]  # seed -> stored records

    @property
    def first(self) -> dict[str, Any]:
        return self.cells[0]

    @property
    def complete(self) -> bool:
        return all(c["status"] == "done" for c in self.cells)

    @property
    def ran(self) -> bool:
        return any(self.records.values())


def _key(cell: dict[str, Any]) -> tuple[Any, ...]:
    return (cell["model"]["name"], cell["dataset"], cell["sequence"], cell["eval_timing"], cell["batch"],
            cell["editor"], cell["variant"])


def load_rows(out: Path) -> list[Row]:
    """The study's rows in plan order, with the records stored so far; not-needed cells are left out."""
    rows: dict[tuple[Any, ...], Row] = {}
    for cell in cell_states(out):
        if cell["status"] == "not needed":
            continue
        row = rows.setdefault(_key(cell), Row([], {}))
        row.cells.append(cell)
        row.records[cell["seed"]] = list(read_records(out / cell["dir"]).values())
    return list(rows.values())


def _metrics(rows: Sequence[Row]) -> list[str]:
    present = {m for row in rows for records in row.records.values() for r in records for m, v in r["post"].items()
               if v is not None}
    return [m for m, _ in COLUMNS if m in present and m != "avg"]


def _cell(estimate: Estimate | None, partial: bool) -> str:
    return "–" if estimate is None else f"{estimate}{'*' if partial else ''}"


def _seeds_note(rows: Sequence[Row]) -> str:
    by_editor: dict[str, set[int]] = {}
    for row in rows:
        by_editor.setdefault(row.first["editor"], set()).update(s for s, r in row.records.items() if r)
    parts = [f"{editor_name(e)}: {', '.join(map(str, sorted(s)))}" for e, s in by_editor.items() if s]
    return "seeds " + "; ".join(parts)


def _protocol(row: Row) -> str:
    c = row.first
    if c["sequence"] == 1:
        return "single editing"
    timing = ", evaluated after each edit" if c["eval_timing"] == "after-each" else ""
    return (f"batch editing B={c['batch']}" if c["batch"] > 1 else "continual editing") + timing


def _row_order(row: Row) -> tuple[Any, ...]:
    c = row.first
    objective = 0 if c["variant"] == "ce" else 1 if c["variant"] == "overtone" else 2
    return (_order(EDITOR_NAMES, c["editor"]), objective)


def result_tables(rows: Sequence[Row]) -> list[PaperTable]:
    """Paper-layout tables: per model and protocol, editors' variants x datasets (or x T for each dataset)."""
    rows = [r for r in rows if r.ran]
    tables = []
    for model, protocol in dict.fromkeys((r.first["model"]["name"], _protocol(r)) for r in rows):
        members = [r for r in rows if (r.first["model"]["name"], _protocol(r)) == (model, protocol)]
        sequences = sorted({r.first["sequence"] for r in members})
        if len(sequences) > 1:  # App. C: one table per dataset, a column group per T
            splits = [([r for r in members if r.first["dataset"] == d], f", {dataset_name(d)}")
                      for d in dict.fromkeys(r.first["dataset"] for r in members)]
        else:
            splits = [(members, "" if sequences == [1] else f", T={sequences[0]}")]
        for group_rows, suffix in splits:
            tables.append(_grid(group_rows, f"{Path(model).name}, {protocol}{suffix} (x100)", len(sequences) > 1))
    return tables


def _grid(rows: Sequence[Row], title: str, by_sequence: bool) -> PaperTable:
    def column(row: Row) -> Any:
        return row.first["sequence"] if by_sequence else row.first["dataset"]

    keys = sorted(dict.fromkeys(column(r) for r in rows),
                  key=lambda k: (k, "") if by_sequence else _order(DATASET_NAMES, k))
    metrics = {k: _metrics([r for r in rows if column(r) == k]) for k in keys}
    groups = [(f"T={k}" if by_sequence else dataset_name(k), [METRIC_HEADERS[m] for m in [*metrics[k], "avg"]])
              for k in keys]
    sections = []
    for editor in dict.fromkeys(r.first["editor"] for r in sorted(rows, key=_row_order)):
        body = []
        members = sorted((r for r in rows if r.first["editor"] == editor), key=_row_order)
        for variant in dict.fromkeys(r.first["variant"] for r in members):
            label = next(r.first["label"] for r in members if r.first["variant"] == variant)
            cells = [label]
            for k in keys:
                row = next((r for r in members if r.first["variant"] == variant and column(r) == k), None)
                estimates = row_estimates(row.records, metrics[k]) if row else {}
                cells += [_cell(estimates.get(m), bool(row) and not row.complete) for m in [*metrics[k], "avg"]]
            body.append(cells)
        sections.append((editor_name(editor), body))
    unit = "chunks" if by_sequence or any(r.first["sequence"] > 1 for r in rows) else "cases"
    caption = (f"Mean over seeds ± half-width of the 95% bootstrap interval over {unit} and seeds "
               f"(docs/studies.md); {_seeds_note(rows)}; * = not all planned cases or seeds finished.")
    return PaperTable(title=title, groups=groups, sections=sections, caption=caption)


def _paired_cell(estimate: Estimate, holm_survives: bool) -> str:
    """A difference with its interval, * when the interval excludes 0, † when it survives Holm's correction."""
    return estimate.signed() + ("*" if estimate.excludes_zero else "") + ("†" if holm_survives else "")


def _paired_table(title: str, pairs: Sequence[tuple[Row, Row]], metrics: Sequence[str], headers: dict[str, str],
                  records_of: Callable[[Records], Records]) -> PaperTable:
    """Each pair's ``other`` minus ``base`` per metric and Avg., with Holm's correction over the table."""
    estimated = [paired_estimates({s: records_of(r) for s, r in base.records.items()},
                                  {s: records_of(r) for s, r in other.records.items()}, metrics)
                 for base, other in pairs]
    # the table's comparisons (rows x metrics with an interval) are one family for Holm's correction
    tested = [e for estimates in estimated for e in estimates.values() if e is not None and e.has_interval]
    survives = iter(holm([e.p_value for e in tested]))
    body = []
    for (base, other), estimates in zip(pairs, estimated, strict=True):
        units = next((e for e in estimates.values() if e is not None), None)
        body.append([f"{other.first['label']} − {base.first['label']}",
                     *("–" if e is None else _paired_cell(e, e.has_interval and next(survives))
                       for e in (estimates[m] for m in [*metrics, "avg"])),
                     "–" if units is None else f"{units.units} {units.unit}s × {units.seeds} seed"
                     f"{'s' if units.seeds > 1 else ''}"])
    return PaperTable(
        title=title, groups=[("", [f"Δ{headers[m]}" for m in [*metrics, "avg"]] + ["paired on"])],
        sections=[("", body)], stub="rows",
        caption="Mean difference [95% bootstrap interval over paired units and seeds]; an interval that "
                "contains 0 is within noise, * = it excludes 0 (bootstrap p < 0.05). "
                f"{len(tested)} comparisons; † significant after Holm's correction over them (family-wise 5%, "
                "on the two-sided bootstrap p-values).")


def paired_tables(rows: Sequence[Row]) -> list[PaperTable]:
    """Every row minus CE (same model, dataset, protocol, editor), and matched-steps controls against their
    source, per metric, with 95% bootstrap intervals over cases (chunks) and seeds; for edit streams also the
    lifelong comparisons (efficacy, generalisation, specificity), where a stream is one unit per seed."""
    rows = [r for r in rows if r.ran]
    tables = []
    for setting in dict.fromkeys(_key(r.first)[:6] for r in rows):
        members = [r for r in rows if _key(r.first)[:6] == setting]
        by_variant = {r.first["variant"]: r for r in members}
        pairs = []
        ce = by_variant.get("ce")
        for row in members:
            source = row.first.get("match_steps")
            if source and source in by_variant:
                pairs.append((row, by_variant[source]))
            elif ce is not None and row is not ce:
                pairs.append((ce, row))
        if not pairs:
            continue
        model, dataset, sequence = setting[0], setting[1], setting[2]
        title = (f"{editor_name(setting[5])} on {dataset_name(dataset)}, {Path(model).name}, "
                 f"{_protocol(members[0])}{'' if sequence == 1 else f' T={sequence}'}: paired differences")
        tables.append(_paired_table(f"{title} (x100)", pairs, _metrics(members), METRIC_HEADERS, list))
        if all(r.first.get("stream") is not None for r in members):
            tables.append(_paired_table(f"{title} of the lifelong metrics (x100)", pairs, LIFELONG_COMPARISONS,
                                        {**LIFELONG_HEADERS, "avg": "Avg."}, lifelong_records))
    return tables


def stream_tables(rows: Sequence[Row]) -> list[PaperTable]:
    """For the study's edit streams, per model and dataset: the lifelong metrics before and after, the curve, and
    the final scores by the batch that made each edit (report/tables.py), one row per setting and seed."""
    rows = [r for r in rows if r.ran and r.first.get("stream") is not None]
    tables = []
    for model, dataset in dict.fromkeys((r.first["model"]["name"], r.first["dataset"]) for r in rows):
        members = sorted((r for r in rows if (r.first["model"]["name"], r.first["dataset"]) == (model, dataset)),
                         key=_row_order)
        labelled = [(f"{editor_name(r.first['editor'])} {r.first['label']}"
                     + (f", seed {seed}" if len(r.records) > 1 else ""), r.first["batch"], records)
                    for r in members for seed, records in sorted(r.records.items()) if records]
        summaries = [(label, summarize(records)) for label, _, records in labelled]
        where = f"{Path(model).name}, {dataset_name(dataset)}"
        tables += [t for t in (lifelong_table(summaries, f"{where}: lifelong metrics, unedited → after the stream"),
                               lifelong_curve_table(summaries, f"{where}: along the stream"),
                               *retention_tables(labelled, f"{where}: by the batch that made the edit")) if t]
    return tables


def study_tables(out: Path) -> list[PaperTable]:
    """All tables of a study directory (results, then paired differences, then the streams' own)."""
    read_plan(out)
    rows = load_rows(out)
    return result_tables(rows) + paired_tables(rows) + stream_tables(rows)
