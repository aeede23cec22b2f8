"""Result tables in the paper's layouts (x100), rendered to the console, Markdown, CSV and HTML.

Columns follow the paper's Table 4.2 and App. C: Rel. Gen. Por. Loc. Avg. for the teacher-forced
benchmarks, Rel. Sng-Hop Mlt-Hop Avg. for MQuAKE. A metric column is shown only when some run of the
table has a value for it, so WikiBio (no rephrases, no portability) gets Rel. Loc. Avg., as in the paper.

A ``PaperTable`` is the one table model: column groups (a dataset or a sequence length) over metric
columns, and row sections (a model or an editor) over method rows. The builders here turn run
directories and traces into such tables; renderers for each output format take any of them.

Every metric column sits under the group of its evaluation protocol: "teacher-forced" (the field's
token accuracy) or "wild" (generated answers, exact match; ``evaluation/wild.py``). Runs evaluated with
both show them side by side, each with its paired OverTone minus CE difference under it.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from overtone.diagnostics import CaseTrace
    from overtone.report.runs import Pair, RunInfo
    from overtone.report.stats import PairedDifference

COLUMNS = (("rel", "Rel."), ("gen", "Gen."), ("por", "Por."), ("loc", "Loc."), ("sng_hop", "Sng-Hop"),
           ("mlt_hop", "Mlt-Hop"), ("avg", "Avg."))
METRIC_HEADERS = dict(COLUMNS)
TAIL = ("cases", "steps", "s/edit")
# The objective's activity, shown when a run recorded it: % of token updates whose target was not the one-hot
# label, and % clipped (OverTone; CE rows read 0.0 / 0.0). A row near 0 mixed is CE in all but the clip.
ACTIVITY = ("mixed %", "clipped %")
ACTIVITY_CAPTION = ("mixed %: token updates whose target differed from the one-hot label; clipped %: token "
                    "updates that sent no gradient.")
TEACHER_FORCED, WILD = "teacher-forced", "wild"  # evaluation protocols, as the runs name them
PROTOCOL_NAMES = {TEACHER_FORCED: "teacher-forced", WILD: "wild (EM)"}
PROTOCOL_SHORT = {TEACHER_FORCED: "TF", WILD: "wild"}  # group headers of the compact console tables
PROTOCOL_CAPTION = ("TF: teacher-forced token accuracy; wild: generated answers, exact match after normalisation "
                    "(Loc.: the same normalised reply as the unedited model).")
Row = tuple[str, dict[str, Any]]
Stream = tuple[str, int, Sequence[dict[str, Any]]]  # a stream run's label, its batch size and its records
# Display names and the paper's order; anything else keeps its own name and sorts after these.
EDITOR_NAMES = {"rome": "ROME", "memit": "MEMIT", "alphaedit": "AlphaEdit", "ultraedit": "UltraEdit", "ft-m": "FT-M",
                "lora": "LoRA", "melo": "MELO", "wise": "WISE"}
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


# always special, or special where they could open an HTML tag (<a, </, <!) or an entity (&amp;, &#38;)
MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~$#]|<(?=[A-Za-z/!?])|&(?=#|\w+;))")


def markdown_text(text: object) -> str:
    """Text as Markdown that renders as itself: prompts, names and paths come from data files, so no emphasis,
    link, HTML tag, entity, math or table cell may start in them; a line break would end a table row."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).splitlines()))


def _markdown_grid(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text headers over rows already in Markdown."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    return "\n".join([line([markdown_text(h) for h in headers]), "|" + "---|" * len(headers), *map(line, rows)])


def markdown_grid(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table of plain-text cells."""
    return _markdown_grid(headers, [[markdown_text(c) for c in row] for row in rows])


def to_markdown(table: PaperTable) -> str:
    """GitHub Markdown; a section header becomes a bold row."""
    rows: list[list[str]] = []
    for label, body in table.sections:
        if label and len(table.sections) > 1:
            rows.append([f"**{markdown_text(label)}**", *([""] * (len(table.headers) - 1))])
        rows += [[markdown_text(c) for c in row] for row in body]
    title = f"**{markdown_text(table.title)}**\n\n" if table.title else ""
    caption = f"\n\n{markdown_text(table.caption)}" if table.caption else ""
    return title + _markdown_grid(table.headers, rows) + caption


def to_rich(table: PaperTable) -> Table:
    """A rich table whose every piece is ``Text``: names and prompts from data are never read as console markup."""
    out = Table(title=Text(table.title, style="table.title") if table.title else None,
                caption=Text(table.caption, style="table.caption") if table.caption else None)
    for i, header in enumerate(table.headers):
        out.add_column(Text(header), justify="left" if i == 0 else "right", style="bold" if i == 0 else None,
                       no_wrap=i == 0)
    for label, body in table.sections:
        if label and len(table.sections) > 1:
            out.add_section()
            out.add_row(Text(label, style="italic"))
        for row in body:
            out.add_row(*(Text(cell) for cell in row))
    return out


def write_csv(path: Path, table: PaperTable) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(table.headers)
        writer.writerows(table.rows())


def metric_columns(summaries: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """The (key, header) metric columns with a value in at least one summary; Avg. always."""
    return [(k, h) for k, h in COLUMNS if k == "avg" or any(s.get(k) is not None for s in summaries)]


def protocol_summaries(summaries: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(protocol, the summaries' blocks of that protocol) for the protocols some summary has, in table order.

    A summary's top-level metrics are teacher-forced; its ``wild`` block holds the wild ones.
    """
    blocks = [(TEACHER_FORCED, [s if TEACHER_FORCED in s.get("protocols", [TEACHER_FORCED]) else {}
                                for s in summaries]),
              (WILD, [s.get(WILD) or {} for s in summaries])]
    return [(p, b) for p, b in blocks if any(k != "avg" and x.get(k) is not None for x in b for k, _ in COLUMNS)]


def cases_cell(summary: dict[str, Any]) -> str:
    """The number of cases, with the number of diverged edits among them when there are any."""
    diverged = summary.get("n_diverged") or 0
    return f"{summary.get('n_cases', '')}" + (f" ({diverged} diverged)" if diverged else "")


def row_cells(label: str, summary: dict[str, Any], columns: Sequence[tuple[str, str]] | None = None,
              activity: bool = False) -> list[str]:
    """Label, the metrics, number of cases (and diverged ones), mean optimiser steps and seconds per edit (with
    eval), and with ``activity`` the objective's mixed % and clipped %."""
    columns = metric_columns([summary]) if columns is None else columns
    return [label, *(_fmt(summary.get(key)) for key, _ in columns), *_tail_cells(summary, activity)]


def _tail_cells(summary: dict[str, Any], activity: bool = False) -> list[str]:
    seconds = (summary.get("mean_edit_s") or 0) + (summary.get("mean_eval_s") or 0)
    cells = [cases_cell(summary), _fmt(summary.get("mean_steps"), 1), _fmt(seconds, 2)]
    if activity:
        measured = summary.get("activity") or {}
        cells += [_fmt(measured.get("mixed_pct"), 1), _fmt(measured.get("clipped_pct"), 1)]
    return cells


def _summary_layout(rows: Sequence[Row], title: str = "", caption: str = "", stub: str = "run") -> PaperTable:
    """One row per run; a column group per evaluation protocol present, then cases, steps and seconds, and the
    objective's activity when the runs recorded it."""
    activity = any(s.get("activity") for _, s in rows)
    tail = [*TAIL, *ACTIVITY] if activity else list(TAIL)
    caption = f"{caption} {ACTIVITY_CAPTION}".strip() if activity else caption
    blocks = protocol_summaries([s for _, s in rows])
    if len(blocks) < 2 and all(p == TEACHER_FORCED for p, _ in blocks):  # the plain layout of one protocol
        columns = metric_columns([s for _, s in rows])
        return PaperTable(title=title, groups=[("", [*(h for _, h in columns), *tail])],
                          sections=[("", [row_cells(label, s, columns, activity) for label, s in rows])], stub=stub,
                          caption=f"{caption} Teacher-forced token accuracy.".strip())
    columns = {p: metric_columns(b) for p, b in blocks}
    groups = [(PROTOCOL_SHORT[p], [h for _, h in columns[p]]) for p, _ in blocks] + [("", tail)]
    body = []
    for i, (label, summary) in enumerate(rows):
        cells = [label]
        for protocol, block in blocks:
            cells += [_fmt(block[i].get(key)) for key, _ in columns[protocol]]
        body.append(cells + _tail_cells(summary, activity))
    return PaperTable(title=title, groups=groups, sections=[("", body)], stub=stub,
                      caption=f"{caption} {PROTOCOL_CAPTION}".strip())


def summary_table(rows: Sequence[Row], title: str | None = None, caption: str | None = None) -> Table:
    return to_rich(_summary_layout(rows, title or "", caption or ""))


def markdown_table(rows: Sequence[Row]) -> str:
    """The same table as GitHub Markdown, for READMEs and issue notes."""
    return to_markdown(_summary_layout(rows))


def wild_detail_table(rows: Sequence[Row], title: str = "") -> PaperTable | None:
    """The wild protocol's other scores, how often the study's "." rule differs, and the evaluation cost."""
    chosen = [(label, s) for label, s in rows if s.get(WILD)]
    if not chosen:
        return None
    body = []
    for label, summary in chosen:
        wild = summary[WILD]
        rule = wild.get("study_rule") or {}
        total, wild_s = summary.get("mean_eval_s"), wild.get("mean_eval_s")
        tf_s = None if total is None or wild_s is None or TEACHER_FORCED not in summary.get("protocols", []) \
            else total - wild_s
        body.append([label, *(_fmt((wild.get("f1") or {}).get(m)) for m in ("rel", "gen", "por")),
                     *(_fmt((wild.get("contains") or {}).get(m)) for m in ("rel", "gen", "por")),
                     _fmt(wild.get("loc"), 1), _fmt((wild.get("loc_tokens") or {}).get("loc"), 1),
                     _fmt(rule.get("differs_pct"), 1), _fmt(rule.get("em_changes_pct"), 1),
                     _fmt(tf_s, 3), _fmt(wild_s, 3)])
    return PaperTable(
        title=title or "Wild protocol: token F1, target contained, locality, the '.' stop rule, evaluation cost",
        groups=[("wild F1", ["Rel.", "Gen.", "Por."]), ("wild contained", ["Rel.", "Gen.", "Por."]),
                ("wild Loc.", ["same reply %", "tok-identical %"]), ("'.' rule", ["differs %", "EM chg %"]),
                ("eval s/case", ["TF", "wild"])],
        sections=[("", body)], stub="run",
        caption="x100. F1: SQuAD token F1. Contained: the normalised answer occurs in the normalised reply as "
                "whole words. Loc.: same reply = the normalised reply up to the stop is unchanged (the wild Loc. "
                "column); tok-identical = its token ids are, up to and including the token that holds the stop. "
                "'.' rule: replies whose text the study's stop at any '.' would cut differently, and "
                "those whose exact match it would change. Eval s/case: seconds per case of each protocol's "
                "evaluation (TF: teacher-forced), before and after the edit together.",
    )


def extra_tables(rows: Sequence[Row], streams: Sequence[Stream] = ()) -> list[PaperTable]:
    """The tables that follow a summary table when its runs have them: wild scores and cost, general ability
    (at chunk ends, and along the chunk with ``--ability-every``), and a stream's lifelong metrics, curve and,
    given the ``streams``' records, its scores by the age of the edit."""
    return [t for t in (wild_detail_table(rows), ability_table(rows), ability_curve_table(rows), lifelong_table(rows),
                        lifelong_curve_table(rows), *retention_tables(streams)) if t]


def stream_of(label: str, config: dict[str, Any], records: Sequence[dict[str, Any]]) -> list[Stream]:
    """``[(label, batch, records)]`` for a run that is an edit stream (``--stream``), else ``[]``."""
    return [(label, int(config["batch"]), records)] if config.get("stream") and config.get("batch") else []


LIFELONG_HEADERS = {"efficacy": "efficacy", "generalization": "generalisation", "specificity": "specificity",
                    "fluency": "fluency (bits)"}
LIFELONG_COMPARISONS = tuple(m for m in LIFELONG_HEADERS if m != "fluency")  # shares of cases; fluency is in bits
LIFELONG_CAPTION = ("The ROME/MEMIT/AlphaEdit papers' metrics (docs/lifelong-streams.md), x100: efficacy and "
                    "generalisation = the share of cases whose new target scores above the old one on the rewrite "
                    "prompt and on its rephrases; specificity = the share of locality prompts whose own answer "
                    "scores above the new target. Fluency: the weighted n-gram entropy in bits of the greedy "
                    "continuation of each rewrite prompt. On ZsRE the papers report Rel., Gen. and Loc. instead.")


def lifelong_table(rows: Sequence[Row], title: str = "") -> PaperTable | None:
    """The lifelong metrics of edit streams, before the stream and after it on the final model (x100)."""
    chosen = [(label, summary["lifelong"]) for label, summary in rows if summary.get("lifelong")]
    if not chosen:
        return None
    body = [[label, *(f"{_fmt(life['pre'].get(m))} → {_fmt(life['post'].get(m))}" for m in LIFELONG_HEADERS)]
            for label, life in chosen]
    return PaperTable(title=title or "Lifelong metrics: unedited → after the stream",
                      groups=[("", list(LIFELONG_HEADERS.values()))], sections=[("", body)], stub="run",
                      caption=LIFELONG_CAPTION)


def lifelong_curve_table(rows: Sequence[Row], title: str = "") -> PaperTable | None:
    """A stream's curve (``--curve-every K``): after every K edits, the metrics of a fixed sample of the edits made."""
    keys = [("rel", "Rel."), ("gen", "Gen."), ("loc", "Loc."), *LIFELONG_HEADERS.items()]
    sections = [(label, [[str(point["edits"]), *(_fmt(point.get(k)) for k, _ in keys)] for point in curve])
                for label, curve in ((label, summary.get("lifelong", {}).get("curve")) for label, summary in rows)
                if curve]
    if not sections:
        return None
    named = f": {sections[0][0]}" if len(sections) == 1 else ""
    return PaperTable(title=title or f"Along the stream{named}", groups=[("", [h for _, h in keys])],
                      sections=sections, stub="edits",
                      caption="After every K edits (--curve-every) and at the stream's end, on --curve-sample of "
                              "the edits made so far (a sample fixed by the seed and the count; the final evaluation "
                              "of every edit is the tables above). Teacher-forced KnowEdit metrics, then the lifelong "
                              "ones, x100.")


AGE_COLUMNS = 10  # at most this many columns: a longer stream's batches are grouped, oldest first
AGE_METRICS = (("post", "rel", "Rel."), ("post", "gen", "Gen."), ("lifelong", "efficacy", "efficacy"),
               ("lifelong", "generalization", "generalisation"))


def _age_value(record: dict[str, Any], source: str, key: str) -> float | None:
    scores = record.get("lifelong", {}).get("post", {}) if source == "lifelong" else record.get("post", {})
    value = scores.get(key)
    return None if value is None else float(value)


def _age_bins(records: Sequence[dict[str, Any]], batch: int) -> tuple[list[str], list[list[dict[str, Any]]]]:
    """Column headers, and the records in columns by the batch that edited them (a chunk's records are in stream
    order): batches numbered from 1, grouped into at most ``AGE_COLUMNS`` columns; column i pools that column
    of every chunk."""
    chunks: dict[Any, list[dict[str, Any]]] = {}
    for record in records:
        chunks.setdefault(record.get("chunk", 0), []).append(record)
    batches = -(-max(len(c) for c in chunks.values()) // batch)
    per_bin = -(-batches // AGE_COLUMNS)
    spans = [(first + 1, min(first + per_bin, batches)) for first in range(0, batches, per_bin)]
    bins: list[list[dict[str, Any]]] = [[] for _ in spans]
    for chunk in chunks.values():
        for i, record in enumerate(chunk):
            bins[i // batch // per_bin].append(record)
    return [str(a) if a == b else f"{a}-{b}" for a, b in spans], bins


def retention_tables(streams: Sequence[Stream], title: str = "") -> list[PaperTable]:
    """The final model's scores of a stream's edits by the batch that made them, oldest first: how much the
    later batches undid the earlier ones, which the stream's one mean hides (x100). One table per layout of
    columns (streams of other lengths or batch sizes get their own)."""
    layouts: dict[tuple[str, ...], list[tuple[str, list[list[dict[str, Any]]]]]] = {}
    for label, batch, records in streams:
        if records:
            headers, bins = _age_bins(records, batch)
            layouts.setdefault(tuple(headers), []).append((label, bins))
    tables = []
    for headers, binned in layouts.items():
        sections = []
        for source, key, name in AGE_METRICS:
            rows = []
            for label, bins in binned:
                values = [[v for r in b if (v := _age_value(r, source, key)) is not None] for b in bins]
                if any(values):
                    rows.append([label, *(_fmt(100 * sum(v) / len(v)) if v else "–" for v in values)])
            if rows:
                sections.append((name, rows))
        tables.append(PaperTable(
            title=title or "By the batch that made the edit, on the final model",
            groups=[("batch", list(headers))],
            sections=sections, stub="run",
            caption="Every edit of the stream scored once on the final model (the tables above), grouped by the "
                    "batch of --batch edits that made it (numbered from the first; a long stream's batches pooled "
                    f"into at most {AGE_COLUMNS} columns): the last column holds the newest edits. Teacher-forced "
                    "Rel. and Gen., then the lifelong efficacy and generalisation, x100."))
    return tables


def _ability_cells(measured: dict[str, Any]) -> list[str]:
    """Edited perplexity, its drift, general facts right and same: the cells both ability tables share."""
    return [_fmt(measured.get("ppl"), 3), _signed(measured.get("ppl_drift_pct")), _fmt(measured.get("facts_right")),
            _fmt(measured.get("facts_same"))]


def ability_table(rows: Sequence[Row], title: str = "") -> PaperTable | None:
    """General ability at the end of each chunk of edits, against the unedited model."""
    chosen = [(label, s) for label, s in rows if s.get("ability")]
    if not chosen:
        return None
    body = []
    for label, summary in chosen:
        a = summary["ability"]
        body.append([label, _fmt(a.get("ppl_unedited"), 3), *_ability_cells(a), str(a.get("facts", "–")),
                     str(a.get("n_measured", "–")), _fmt(a.get("mean_s"), 1)])
    return PaperTable(
        title=title or "General ability after each chunk of edits",
        groups=[("perplexity", ["unedited", "edited", "drift %"]),
                ("general facts", ["right %", "same %", "n"]), ("", ["chunks", "s/check"])],
        sections=[("", body)], stub="run",
        caption="Measured with every edit of a chunk applied, before its revert; means over chunks. Perplexity: "
                "64 tokens of each of 64 held-out articles of the offline Wikipedia (never read by the ROME/MEMIT "
                "statistics); "
                "drift = edited / unedited - 1. General facts: the n shipped facts the unedited model answers "
                "right; right % still answered right, same %: the same generated tokens as the unedited model. "
                "s/check: seconds per measurement.",
    )


def ability_curve_table(rows: Sequence[Row], title: str = "") -> PaperTable | None:
    """General ability after every K edits of a chunk (``--ability-every K``), one section per run."""
    sections = [(label, [[str(p["edits"]), *_ability_cells(p), str(p.get("n_measured", "–"))]
                         for p in summary["ability"]["curve"]])
                for label, summary in rows if summary.get("ability", {}).get("curve")]
    if not sections:
        return None
    named = f": {sections[0][0]}" if len(sections) == 1 else ""  # one section is printed without its header
    return PaperTable(
        title=title or f"General ability along each chunk of edits{named}",
        groups=[("perplexity", ["edited", "drift %"]), ("general facts", ["right %", "same %"]), ("", ["chunks"])],
        sections=sections, stub="edits",
        caption="The same measurements as the table above, made after every K edits of a chunk (--ability-every "
                "K), before the chunk's later edits; means over chunks.",
    )


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


def _sort_key(key: Any) -> Any:
    """Column groups in the paper's order: datasets by DATASET_NAMES, numbers ascending, protocols TF first."""
    if isinstance(key, tuple):
        return tuple(_sort_key(k) for k in key)
    if key in PROTOCOL_NAMES:
        return (list(PROTOCOL_NAMES).index(key), key)
    return _order(DATASET_NAMES, key) if isinstance(key, str) else (key, "")


def _delta_cells(rows: Sequence[tuple[str, list[PairedDifference | None]]]) -> list[list[str]]:
    """Rows of paired differences as cells, marked after Holm's correction over all of them (one table)."""
    from overtone.report.stats import holm_family

    found = [d for _, diffs in rows for d in diffs if d is not None]
    corrected = iter(holm_family(found))
    return [[label, *("–" if d is None else _delta_text(next(corrected)) for d in diffs)] for label, diffs in rows]


def _delta_text(d: PairedDifference) -> str:
    return "–" if d.n == 0 else d.marked


def _delta_rows(members: Sequence[RunInfo], keys: Sequence[Any], metrics: dict[Any, list[str]],
                column: Callable[[RunInfo], Any]) -> list[tuple[str, list[PairedDifference | None]]]:
    """Under the method rows: per editor, OverTone minus CE paired per case, in each column group (None: no
    pair there)."""
    from overtone.report.stats import paired_difference

    rows = []
    for editor in _unique(r.editor for r in members):
        pairs: dict[str, dict[Any, tuple[RunInfo, RunInfo]]] = {}
        for k in keys:
            runs = [r for r in members if r.editor == editor and column(r) == k]
            for ot in (r for r in runs if r.objective == "OverTone"):
                for ce in (r for r in runs if r.objective == "CE" and r.comparison_key == ot.comparison_key):
                    pairs.setdefault(ot.tag, {})[k] = (ce, ot)
        for tag, by_key in pairs.items():
            diffs: list[PairedDifference | None] = []
            for k in keys:
                pair = by_key.get(k)
                diffs += [paired_difference(pair[0].records, pair[1].records, m) if pair else None
                          for m in metrics[k]]
            rows.append((f"Δ {editor_name(editor)} OverTone − CE" + (f" ({tag})" if tag else ""), diffs))
    return rows


def _grid(title: str, runs: Sequence[RunInfo], column: Callable[[RunInfo], Any], group_label: Callable[[Any], str],
          section: Callable[[RunInfo], str], caption: str) -> PaperTable:
    """Rows = methods within sections, column groups = values of ``column``, each with its metrics; under the
    methods of a section, the paired OverTone minus CE difference of each editor that has both."""
    keys = sorted(_unique(column(r) for r in runs), key=_sort_key)
    metrics = {k: _metrics([r for r in runs if column(r) == k]) for k in keys}
    groups = [(group_label(k), [METRIC_HEADERS[m] for m in metrics[k]]) for k in keys]
    sections, deltas = [], []
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
        deltas.append(_delta_rows(members, keys, metrics, column))
    # the Δ rows of every section are one family: corrected together, then placed under their sections
    marked = iter(_delta_cells([row for rows in deltas for row in rows]))
    sections = [(name, rows + [next(marked) for _ in section_deltas])
                for (name, rows), section_deltas in zip(sections, deltas, strict=True)]
    found = [d for rows in deltas for _, diffs in rows for d in diffs if d is not None]
    if found:
        from overtone.report.stats import holm_note

        caption = f"{caption} {holm_note(found)}"
    return PaperTable(title=title, groups=groups, sections=sections, caption=caption)


def _with_protocol(key: Callable[[RunInfo], Any], label: Callable[[Any], str], runs: Sequence[RunInfo],
                   ) -> tuple[Callable[[RunInfo], Any], Callable[[Any], str]]:
    """Column key and label that add the evaluation protocol when the runs hold more than one."""
    if len({r.evaluation for r in runs}) < 2:
        return key, label
    return (lambda r: (key(r), r.evaluation)), (lambda k: f"{label(k[0])}, {PROTOCOL_NAMES[k[1]]}")


DELTA_NOTE = ("Δ rows: OverTone minus CE on the cases both runs finished, paired (report.stats), ± 95% "
              "t-interval over cases (continual: over chunks); * = the interval excludes 0.")


def _cases_note(runs: Sequence[RunInfo]) -> str:
    counts = sorted({int(r.summary.get("n_cases") or 0) for r in runs})
    note = f"cases per run: {', '.join(map(str, counts))}"
    diverged = [f"{method_label(r)} {r.summary['n_diverged']}" for r in runs if r.summary.get("n_diverged")]
    return note + (f"; diverged edits: {', '.join(diverged)}" if diverged else "")


def _protocol_note(runs: Sequence[RunInfo]) -> str:
    """E.g. "Teacher-forced token accuracy; wild: generated answers, ..." for the protocols of ``runs``."""
    notes = {TEACHER_FORCED: "teacher-forced token accuracy",
             WILD: "wild: generated answers, exact match (Loc.: the same normalised reply)"}
    text = "; ".join(notes[p] for p in PROTOCOL_NAMES if any(r.evaluation == p for r in runs))
    return text[:1].upper() + text[1:]


def single_editing_table(runs: Sequence[RunInfo]) -> PaperTable | None:
    """Paper Table 4.2: one section per model, one column group per dataset (and protocol); CE and OverTone rows."""
    chosen = [r for r in runs if r.protocol == "single" and not r.objective.startswith("w/o")]
    if not chosen:
        return None
    column, label = _with_protocol(lambda r: r.dataset, dataset_name, chosen)
    return _grid("Single editing (x100)", chosen, column, label, lambda r: r.model,
                 f"{_protocol_note(chosen)} x100; Avg. is the mean of the metrics shown. "
                 f"{DELTA_NOTE} {_cases_note(chosen)}.")


def continual_tables(runs: Sequence[RunInfo]) -> list[PaperTable]:
    """Continual editing (paper App. C): per model, dataset and evaluation timing, a column group per T
    (and protocol)."""
    chosen = [r for r in runs if r.protocol == "continual" and not r.objective.startswith("w/o")]
    tables = []
    for model, dataset, timing in _unique((r.model, r.dataset, r.eval_timing) for r in chosen):
        members = [r for r in chosen if (r.model, r.dataset, r.eval_timing) == (model, dataset, timing)]
        column, label = _with_protocol(lambda r: r.sequence, lambda t: f"T={t}", members)
        tables.append(_grid(f"Continual editing, {dataset_name(dataset)}, {model} (x100)", members, column, label,
                            lambda r: "", f"{_protocol_note(members)}. Evaluation timing: "
                            f"{timing or 'not recorded'}. {DELTA_NOTE} {_cases_note(members)}."))
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
            column, label = _with_protocol(lambda r: r.dataset, dataset_name, members)
            tables.append(_grid(f"Ablations, {dataset_name(dataset)}, {model} (x100)", members, column, label,
                                lambda r: editor_name(r.editor), f"{DELTA_NOTE} {_cases_note(members)}."))
    return tables


def ability_rows(runs: Sequence[RunInfo]) -> list[Row]:
    """(label, summary) of every run that measured the general ability, for ``ability_table``."""
    return [(f"{method_label(r)}, {dataset_name(r.dataset)}, T={r.sequence}", r.summary)
            for r in runs if r.summary.get("ability")]


def gain_table(pairs: Sequence[Pair]) -> PaperTable | None:
    """OverTone minus CE for every pair of runs that differ only in the objective, with a 95% interval."""
    from overtone.report.stats import holm_family, holm_note

    if not pairs:
        return None
    pairs = sorted(pairs, key=lambda p: (_sort_key(p.ce.evaluation), _order(EDITOR_NAMES, p.ce.editor), p.ce.dataset,
                                         p.ce.sequence))
    measured = [p.avg for p in pairs if p.avg is not None]
    corrected = iter(holm_family(measured))
    sections: dict[str, list[list[str]]] = {}
    for p in pairs:
        avg = None if p.avg is None else next(corrected)
        verdict = {None: "–", True: "within noise"}.get(p.within_noise, "gain" if (p.delta["avg"] or 0) > 0
                                                        else "loss")
        if p.within_noise is False and avg is not None and not avg.holm:
            verdict += ", not after Holm"
        label = f"{editor_name(p.ce.editor)}, {dataset_name(p.ce.dataset)}, T={p.ce.sequence}"
        if p.overtone.tag:
            label += f" ({p.overtone.tag})"
        paired = avg if avg is not None and avg.n > 0 else None
        section = p.ce.model
        if p.ce.evaluation != TEACHER_FORCED:
            section += f", {PROTOCOL_NAMES[p.ce.evaluation]}"
        sections.setdefault(section, []).append([
            label, str(p.n_cases or "–"), _fmt(p.ce_summary.get("avg")), _fmt(p.overtone_summary.get("avg")),
            *(_signed(p.delta[m]) for m in ("rel", "gen", "por", "loc", "avg")),
            "–" if paired is None else paired.marked,
            "–" if paired is None else f"{paired.wins}/{paired.ties}/{paired.losses}", verdict,
        ])
    columns = ["cases", "CE Avg.", "OverTone Avg.", "ΔRel.", "ΔGen.", "ΔPor.", "ΔLoc.", "ΔAvg.",
               "ΔAvg. ± 95%", "W/T/L", "verdict"]
    return PaperTable(
        title="OverTone minus CE, paired (x100 points)", groups=[("", columns)], sections=list(sections.items()),
        stub="editor, dataset, T",
        caption="Runs whose configurations differ only in the objective, compared on the cases both finished. "
                "Δ: difference of the tables' means. ΔAvg. ± 95%: the same difference with its 95% t-interval "
                "over cases (continual: over chunks; report.stats), * when it excludes 0; 'within noise' when it "
                "covers 0, 'not after Holm' when it excludes 0 but the difference is not significant after Holm's "
                "correction. W/T/L: cases (chunks) where OverTone wins, ties, loses on Avg. " + holm_note(measured),
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


Results = Sequence[tuple[str, dict[str, Any], Sequence[dict[str, Any]]]]  # label, summary, records of each run


def lifelong_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A stream's records with its lifelong comparisons (not fluency, in bits) as their ``post`` metrics."""
    return [{**{k: r[k] for k in ("case_id", "chunk") if k in r},
             "post": {m: v for m, v in r["lifelong"]["post"].items() if m in LIFELONG_COMPARISONS}}
            for r in records if "lifelong" in r]


def _paired_layout(results: Results, base: int, title: str = "", caption: str = "",
                   by_case: bool = False) -> PaperTable:
    """Per run, the paired differences to ``results[base]`` under the group of each protocol present, and of the
    lifelong comparisons when the runs are streams."""
    from overtone.evaluation.wild import protocol_records
    from overtone.report.stats import holm_family, holm_note, paired_differences

    blocks = protocol_summaries([summary for _, summary, _ in results])
    columns = {p: metric_columns(b) for p, b in blocks}
    base_records = {p: protocol_records(results[base][2], p) for p, _ in blocks}
    streams = all(summary.get("lifelong") for _, summary, _ in results)
    if streams:
        blocks = [*blocks, ("lifelong", {})]
        columns["lifelong"] = [*((m, LIFELONG_HEADERS[m]) for m in LIFELONG_COMPARISONS), ("avg", "Avg.")]
        base_records["lifelong"] = lifelong_records(results[base][2])

    def records_of(records: Sequence[dict[str, Any]], protocol: str) -> list[dict[str, Any]]:
        return lifelong_records(records) if protocol == "lifelong" else protocol_records(records, protocol)

    rows = [(label, [paired_differences(base_records[protocol], records_of(records, protocol),
                                        [key for key, _ in columns[protocol]], by_case) for protocol, _ in blocks])
            for i, (label, _summary, records) in enumerate(results) if i != base]
    # every cell of the table is one comparison of one family, corrected together
    found = [d for _, per_protocol in rows for diffs in per_protocol for d in diffs.values()]
    corrected = iter(holm_family(found))
    body = []
    for label, per_protocol in rows:
        cells, paired = [label], ""
        for diffs in per_protocol:
            diffs = {key: next(corrected) for key in diffs}
            avg = diffs["avg"]
            cells += [d.marked for d in diffs.values()]
            cells.append(f"{avg.wins}/{avg.ties}/{avg.losses}")
            chunks = f"{avg.n} chunk{'s' if avg.n != 1 else ''}"
            paired = paired or (str(avg.cases) if avg.unit == "case" else f"{avg.cases} in {chunks}")
        body.append([*cells, paired])
    single = len(blocks) == 1 and blocks[0][0] == TEACHER_FORCED
    groups = [("" if single else PROTOCOL_SHORT.get(p, p), [*(f"Δ{h}" for _, h in columns[p]), "W/T/L (Avg.)"])
              for p, _ in blocks]
    if single:
        groups = [("", [*groups[0][1], "paired cases"])]
    else:
        groups.append(("", ["paired cases"]))
    caption = " ".join(part for part in (caption, BY_CASE_CAPTION if by_case else "", holm_note(found),
                                         "" if single else PROTOCOL_CAPTION, LIFELONG_PAIRED if streams else "")
                       if part)
    return PaperTable(title=title, groups=groups, sections=[("", body)], stub="run", caption=caption)


PAIRED_CAPTION = ("Δ = difference to the base row on the paired cases (ΔAvg. = difference of the rows' Avg.) "
                  "± 95% t-interval over cases (continual: over chunks); * = interval excludes 0 (p < 0.05, "
                  "two-sided paired t); comparisons = rows x metrics with an interval; W/T/L = cases (chunks) "
                  "won/tied/lost on Avg.")


BY_CASE_CAPTION = ("By case (--by-case): the interval is over the cases even where they share an edited model (a "
                   "stream, a chunk), so it is optimistic: it holds the cases' variation, not that between streams.")
LIFELONG_PAIRED = "lifelong: the comparisons of the lifelong table, per case (0 or 1, or a mean over probes)."


def paired_table(results: Results, base: int = 0, title: str | None = None, by_case: bool = False) -> Table:
    """Per-case paired differences to ``results[base]``: mean ± 95% half-width (* = beyond noise), x100."""
    return to_rich(_paired_layout(results, base, title or "", PAIRED_CAPTION, by_case))


def paired_markdown(results: Results, base: int = 0, by_case: bool = False) -> str:
    return to_markdown(_paired_layout(results, base, caption=PAIRED_CAPTION, by_case=by_case))
