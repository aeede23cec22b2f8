"""Result tables in the paper's layouts (x100), rendered to the console, Markdown, CSV and HTML.

Columns follow the paper's Table 4.2 and App. C: Rel. Gen. Por. Loc. Avg. for the teacher-forced
benchmarks, Rel. Sng-Hop Mlt-Hop Avg. for MQuAKE. A metric column is shown only when some run of the
table has a value for it, so WikiBio (no rephrases, no portability) gets Rel. Loc. Avg., as in the paper.

A ``PaperTable`` is the one table model: column groups (a dataset or a sequence length) over metric
columns, and row sections (a model or an editor) over method rows. The builders here turn run
directories and traces into such tables; renderers for each output format take any of them.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

if TYPE_CHECKING:
    from overtone.diagnostics import CaseTrace
    from overtone.report.runs import Pair, RunInfo

COLUMNS = (("rel", "Rel."), ("gen", "Gen."), ("por", "Por."), ("loc", "Loc."), ("sng_hop", "Sng-Hop"),
           ("mlt_hop", "Mlt-Hop"), ("avg", "Avg."))
METRIC_HEADERS = dict(COLUMNS)
TAIL = ("cases", "steps", "s/edit")
Row = tuple[str, dict[str, Any]]
# Display names and the paper's order; anything else keeps its own name and sorts after these.
EDITOR_NAMES = {"rome": "ROME", "memit": "MEMIT", "ft-m": "FT-M", "lora": "LoRA", "melo": "MELO", "wise": "WISE"}
DATASET_NAMES = {"zsre": "ZsRE", "wikidata-counterfact": "Wiki_cf", "wikidata-recent": "Wiki_recent",
                 "wikibio": "WikiBio", "mquake": "MQuAKE"}
PROBE_NAMES = {"rel": "Reliability (edit prompt)", "gen": "Generality (rephrase)", "por": "Portability",
               "loc": "Locality"}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:+.{digits}f}"


def editor_name(name: str) -> str:
    return EDITOR_NAMES.get(name, name)


def dataset_name(name: str) -> str:
    return DATASET_NAMES.get(name, name)


def _order(names: dict[str, str], key: str) -> tuple[int, str]:
    order = list(names)
    return (order.index(key) if key in order else len(order), key)


@dataclass
class PaperTable:
    """Column groups over columns, row sections over rows; every cell is already formatted text."""

    title: str
    groups: list[tuple[str, list[str]]]  # (group header, its column headers); "" = no spanning header
    sections: list[tuple[str, list[list[str]]]] = field(default_factory=list)  # (section header, rows)
    stub: str = "method"  # header of the row-label column
    caption: str = ""

    @property
    def headers(self) -> list[str]:
        """Flat headers, the group prefixed, for formats without spanning cells."""
        return [self.stub, *(f"{g} {c}".strip() for g, cols in self.groups for c in cols)]

    def rows(self) -> list[list[str]]:
        return [row for _, rows in self.sections for row in rows]


def markdown_grid(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), "|" + "---|" * len(headers), *(line(r) for r in rows)])


def to_markdown(table: PaperTable) -> str:
    """GitHub Markdown; a section header becomes a bold row."""
    rows: list[list[str]] = []
    for label, body in table.sections:
        if label and len(table.sections) > 1:
            rows.append([f"**{label}**", *([""] * (len(table.headers) - 1))])
        rows += body
    title = f"**{table.title}**\n\n" if table.title else ""
    caption = f"\n\n{table.caption}" if table.caption else ""
    return title + markdown_grid(table.headers, rows) + caption


def to_rich(table: PaperTable) -> Table:
    out = Table(title=table.title or None, caption=table.caption or None)
    for i, header in enumerate(table.headers):
        out.add_column(header, justify="left" if i == 0 else "right", style="bold" if i == 0 else None,
                       no_wrap=i == 0)
    for label, body in table.sections:
        if label and len(table.sections) > 1:
            out.add_section()
            out.add_row(f"[italic]{label}[/]")
        for row in body:
            out.add_row(*row)
    return out


def write_csv(path: Path, table: PaperTable) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(table.headers)
        writer.writerows(table.rows())


def metric_columns(summaries: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """The (key, header) metric columns with a value in at least one summary; Avg. always."""
    return [(k, h) for k, h in COLUMNS if k == "avg" or any(s.get(k) is not None for s in summaries)]


def cases_cell(summary: dict[str, Any]) -> str:
    """The number of cases, with the number of diverged edits among them when there are any."""
    diverged = summary.get("n_diverged") or 0
    return f"{summary.get('n_cases', '')}" + (f" ({diverged} diverged)" if diverged else "")


def row_cells(label: str, summary: dict[str, Any], columns: Sequence[tuple[str, str]] | None = None) -> list[str]:
    """Label, the metrics, number of cases (and diverged ones), mean optimiser steps and seconds per edit (with
    eval)."""
    columns = metric_columns([summary]) if columns is None else columns
    seconds = (summary.get("mean_edit_s") or 0) + (summary.get("mean_eval_s") or 0)
    return [
        label,
        *(_fmt(summary.get(key)) for key, _ in columns),
        cases_cell(summary),
        _fmt(summary.get("mean_steps"), 1),
        _fmt(seconds, 2),
    ]


def _summary_layout(rows: Sequence[Row], title: str = "", caption: str = "", stub: str = "run") -> PaperTable:
    columns = metric_columns([s for _, s in rows])
    return PaperTable(title=title, groups=[("", [*(h for _, h in columns), *TAIL])],
                      sections=[("", [row_cells(label, s, columns) for label, s in rows])], stub=stub,
                      caption=caption)


def summary_table(rows: Sequence[Row], title: str | None = None, caption: str | None = None) -> Table:
    return to_rich(_summary_layout(rows, title or "", caption or ""))


def markdown_table(rows: Sequence[Row]) -> str:
    """The same table as GitHub Markdown, for READMEs and issue notes."""
    return to_markdown(_summary_layout(rows))


def protocol_title(config: dict[str, Any]) -> str:
    """E.g. ``zsre, single editing`` or ``wikibio, continual T=10`` (from a run's config)."""
    dataset = (config.get("dataset") or {}).get("name", "?")
    sequence = config.get("sequence", 1)
    if sequence == 1:
        return f"{dataset}, single editing"
    timing = ", evaluated after each edit" if config.get("eval_timing") == "after-each" else ""
    batch = config.get("batch", 1)
    if batch > 1:
        return f"{dataset}, batch editing B={batch}, T={sequence}{timing}"
    return f"{dataset}, continual T={sequence}{timing}"


def dataset_tables(runs: Sequence[tuple[str, dict[str, Any], dict[str, Any]]]) -> list[tuple[str, list[Row]]]:
    """Runs given as (label, config, summary), grouped into one table per dataset and protocol, in input order."""
    groups: dict[str, list[Row]] = {}
    for label, config, summary in runs:
        groups.setdefault(protocol_title(config), []).append((label, summary))
    return list(groups.items())


# ---- tables of run directories -----------------------------------------------------------------------


def method_label(run: RunInfo) -> str:
    """'FT-M' for the editor's own loss, 'FT-M + OverTone' / 'FT-M + w/o clip' otherwise, plus its tag."""
    editor = editor_name(run.editor)
    base = editor if run.objective in ("CE", "-") else f"{editor} + {run.objective}"
    return f"{base} ({run.tag})" if run.tag else base


def _row_order(run: RunInfo) -> tuple[Any, ...]:
    objective = 0 if run.objective in ("CE", "-") else 1 if run.objective == "OverTone" else 2
    return (_order(EDITOR_NAMES, run.editor), objective, run.objective, run.tag)


def _metrics(runs: Sequence[RunInfo]) -> list[str]:
    present = [m for m, _ in COLUMNS[:-1] if any(r.summary.get(m) is not None for r in runs)]
    return [*present, "avg"]


def _unique(values: Any) -> list[Any]:
    return list(dict.fromkeys(values))


def _grid(title: str, runs: Sequence[RunInfo], column: Callable[[RunInfo], Any], group_label: Callable[[Any], str],
          section: Callable[[RunInfo], str], caption: str) -> PaperTable:
    """Rows = methods within sections, column groups = values of ``column``, each with its metrics."""
    keys = sorted(_unique(column(r) for r in runs), key=lambda k: (_order(DATASET_NAMES, k) if isinstance(k, str)
                                                                   else (k, "")))
    metrics = {k: _metrics([r for r in runs if column(r) == k]) for k in keys}
    groups = [(group_label(k), [METRIC_HEADERS[m] for m in metrics[k]]) for k in keys]
    sections = []
    for name in _unique(section(r) for r in runs):
        members = sorted((r for r in runs if section(r) == name), key=_row_order)
        rows = []
        for label in _unique(method_label(r) for r in members):
            cells = [label]
            for k in keys:
                run = next((r for r in members if method_label(r) == label and column(r) == k), None)
                cells += [_fmt(run.summary.get(m) if run else None) for m in metrics[k]]
            rows.append(cells)
        sections.append((name, rows))
    return PaperTable(title=title, groups=groups, sections=sections, caption=caption)


def _cases_note(runs: Sequence[RunInfo]) -> str:
    counts = sorted({int(r.summary.get("n_cases") or 0) for r in runs})
    note = f"cases per run: {', '.join(map(str, counts))}"
    diverged = [f"{method_label(r)} {r.summary['n_diverged']}" for r in runs if r.summary.get("n_diverged")]
    return note + (f"; diverged edits: {', '.join(diverged)}" if diverged else "")


def single_editing_table(runs: Sequence[RunInfo]) -> PaperTable | None:
    """Paper Table 4.2: one section per model, one column group per dataset; CE and OverTone rows."""
    chosen = [r for r in runs if r.protocol == "single" and not r.objective.startswith("w/o")]
    if not chosen:
        return None
    return _grid("Single editing (x100)", chosen, lambda r: r.dataset, dataset_name, lambda r: r.model,
                 f"Teacher-forced token accuracy x100; Avg. is the mean of the metrics shown. {_cases_note(chosen)}.")


def continual_tables(runs: Sequence[RunInfo]) -> list[PaperTable]:
    """Continual editing (paper App. C): per model, dataset and evaluation timing, a column group per T."""
    chosen = [r for r in runs if r.protocol == "continual" and not r.objective.startswith("w/o")]
    tables = []
    for model, dataset, timing in _unique((r.model, r.dataset, r.eval_timing) for r in chosen):
        members = [r for r in chosen if (r.model, r.dataset, r.eval_timing) == (model, dataset, timing)]
        tables.append(_grid(f"Continual editing, {dataset_name(dataset)}, {model} (x100)", members,
                            lambda r: r.sequence, lambda t: f"T={t}", lambda r: "",
                            f"Evaluation timing: {timing or 'not recorded'}. {_cases_note(members)}."))
    return tables


def ablation_tables(runs: Sequence[RunInfo]) -> list[PaperTable]:
    """Paper Table 4.4: per model and dataset, the editor with CE, each OverTone ablation, and OverTone."""
    chosen = [r for r in runs if r.protocol == "single"]
    tables = []
    for model, dataset in _unique((r.model, r.dataset) for r in chosen):
        members = [r for r in chosen if (r.model, r.dataset) == (model, dataset)]
        editors = {r.editor for r in members if r.objective.startswith("w/o")}
        members = [r for r in members if r.editor in editors]
        if members:
            tables.append(_grid(f"Ablations, {dataset_name(dataset)}, {model} (x100)", members, lambda r: r.dataset,
                                dataset_name, lambda r: editor_name(r.editor), _cases_note(members) + "."))
    return tables


def gain_table(pairs: Sequence[Pair]) -> PaperTable | None:
    """OverTone minus CE for every pair of runs that differ only in the objective, with a 95% interval."""
    if not pairs:
        return None
    sections: dict[str, list[list[str]]] = {}
    for p in sorted(pairs, key=lambda p: (_order(EDITOR_NAMES, p.ce.editor), p.ce.dataset, p.ce.sequence)):
        verdict = {None: "–", True: "within noise"}.get(p.within_noise, "gain" if (p.delta["avg"] or 0) > 0
                                                        else "loss")
        label = f"{editor_name(p.ce.editor)}, {dataset_name(p.ce.dataset)}, T={p.ce.sequence}"
        if p.overtone.tag:
            label += f" ({p.overtone.tag})"
        paired = p.avg if p.avg is not None and p.avg.n > 1 else None
        sections.setdefault(p.ce.model, []).append([
            label, str(p.n_cases or "–"), _fmt(p.ce_summary.get("avg")), _fmt(p.overtone_summary.get("avg")),
            *(_signed(p.delta[m]) for m in ("rel", "gen", "por", "loc", "avg")),
            "–" if paired is None else f"{paired.mean:+.2f} ± {paired.half_width:.2f}",
            "–" if paired is None else f"{paired.wins}/{paired.ties}/{paired.losses}", verdict,
        ])
    columns = ["cases", "CE Avg.", "OverTone Avg.", "ΔRel.", "ΔGen.", "ΔPor.", "ΔLoc.", "ΔAvg.",
               "ΔAvg. ± 95%", "W/T/L", "verdict"]
    return PaperTable(
        title="OverTone minus CE, paired (x100 points)", groups=[("", columns)], sections=list(sections.items()),
        stub="editor, dataset, T",
        caption="Runs whose configurations differ only in the objective, compared on the cases both finished. "
                "Δ: difference of the tables' means. ΔAvg. ± 95%: the same difference with its 95% t-interval "
                "over cases (continual: over chunks; report.stats); 'within noise' when the interval covers 0. "
                "W/T/L: cases (chunks) where OverTone wins, ties, loses on Avg.",
    )


def runs_table(runs: Sequence[RunInfo]) -> PaperTable:
    """Every input run with its configuration and cost, in the ``overtone table`` layout."""
    rows: list[Row] = []
    for run in runs:
        what = f"{run.path.name}: {method_label(run)}, {dataset_name(run.dataset)}, {run.model}, T={run.sequence}"
        rows.append((what, run.summary))
    return _summary_layout(rows, "Runs (x100)")


# ---- tables of traces ------------------------------------------------------------------------------------


def _token(text: str) -> str:
    return repr(text)


def token_table(traces: Sequence[CaseTrace]) -> PaperTable:
    """Per target token and objective: pre-edit and final loss, final and lowest UD, clipping and mixing counts."""
    sections: dict[str, list[list[str]]] = {}
    for t in traces:
        rows = len(t.steps)
        for i, token in enumerate(t.tokens):
            ud = [row[i] for row in t.ud]
            low = min(range(rows), key=lambda r: ud[r])
            sections.setdefault(f"{t.case_id}: {t.prompt} → {t.target}", []).append([
                t.label, str(i + 1), _token(token), _token(t.greedy_tokens[i]),
                _fmt(-t.label_log_prob[0][i], 3), _fmt(-t.label_log_prob[-1][i], 3),
                _fmt(ud[-1], 3), f"{ud[low]:.3f} @{t.steps[low]}",
                f"{sum(row[i] for row in t.clipped)}/{rows}", f"{sum(row[i] for row in t.mixed)}/{rows}",
                _fmt(t.token_loss[-1][i], 4),
            ])
    columns = ["i", "token", "unedited greedy", "NLL before", "NLL final", "UD final", "UD min @step",
               "clipped rows", "mixture rows", "loss final"]
    return PaperTable(
        title="Per-token trace (nats)", groups=[("", columns)], sections=list(sections.items()), stub="objective",
        caption="NLL = -log p(label); UD = log p0(unedited greedy token) - log p(label), < 0 = overfitted; "
                "'clipped' = the token sent no gradient; 'mixture' = its target was the smoothed mixture "
                "rather than the one-hot label; rows = recorded steps (the last is the final weights).",
    )


def trace_summary_table(traces: Sequence[CaseTrace]) -> PaperTable:
    """Per case and objective: updates, how many tokens end overfitted, and the probe losses before/after."""
    rows = []
    for t in traces:
        final = t.ud[-1]
        lowest = min(min(row) for row in t.ud)
        probes = [f"{_fmt(v[0])} → {_fmt(v[-1])}" if v and v[0] is not None else "–"
                  for v in (t.probe_loss.get(m, []) for m in ("gen", "por", "loc"))]
        rows.append([f"{t.case_id} {t.label}", str(t.steps[-1]), f"{sum(u < 0 for u in final)}/{len(final)}",
                     _fmt(min(final), 3), _fmt(lowest, 3), *probes])
    columns = ["updates", "UD<0 at end", "min UD end", "min UD", "Gen. loss", "Por. loss", "Loc. loss"]
    return PaperTable(title="Trace summary (nats)", groups=[("", columns)], sections=[("", rows)],
                      stub="case, objective",
                      caption="UD<0 at end: tokens overfitted with the final weights; min UD: lowest over tokens "
                              "and steps. Probe losses: mean NLL per answer token before the edit → with the final "
                              "weights.")


def _paired_rows(results: Sequence[tuple[str, dict[str, Any], Sequence[dict[str, Any]]]], base: int):
    from overtone.report.stats import paired_differences

    _, _, base_records = results[base]
    columns = metric_columns([summary for _, summary, _ in results])
    for i, (label, _summary, records) in enumerate(results):
        if i == base:
            continue
        diffs = paired_differences(base_records, records, [key for key, _ in columns])
        avg = diffs["avg"]
        cells = [str(diffs[key]) + ("*" if diffs[key].significant else "") for key, _ in columns]
        paired = str(avg.cases) if avg.unit == "case" else f"{avg.cases} in {avg.n} chunks"
        yield [label, *cells, f"{avg.wins}/{avg.ties}/{avg.losses}", paired]


def _paired_headers(results: Sequence[tuple[str, dict[str, Any], Sequence[dict[str, Any]]]]) -> list[str]:
    columns = metric_columns([summary for _, summary, _ in results])
    return [*(f"Δ{h}" for _, h in columns), "W/T/L (Avg.)", "paired cases"]
PAIRED_CAPTION = ("Δ = difference to the base row on the paired cases (ΔAvg. = difference of the rows' Avg.) "
                  "± 95% t-interval over cases (continual: over chunks); * = interval excludes 0; "
                  "W/T/L = cases (chunks) won/tied/lost on Avg.")


def _paired_layout(results: Sequence[tuple[str, dict[str, Any], Sequence[dict[str, Any]]]], base: int,
                   title: str = "", caption: str = "") -> PaperTable:
    return PaperTable(title=title, groups=[("", _paired_headers(results))],
                      sections=[("", list(_paired_rows(results, base)))], stub="run", caption=caption)


def paired_table(
    results: Sequence[tuple[str, dict[str, Any], Sequence[dict[str, Any]]]], base: int = 0, title: str | None = None
) -> Table:
    """Per-case paired differences to ``results[base]``: mean ± 95% half-width (* = beyond noise), x100."""
    return to_rich(_paired_layout(results, base, title or "", PAIRED_CAPTION))


def paired_markdown(results: Sequence[tuple[str, dict[str, Any], Sequence[dict[str, Any]]]], base: int = 0) -> str:
    return to_markdown(_paired_layout(results, base))

