"""One self-contained HTML page, and its Markdown twin, from run directories and traces.

The HTML page embeds every figure as a base64 ``data:`` URI and its style inline: it references no
file and no network address, so it can be mailed, archived or opened offline. The Markdown version
links the same figures, written as PNG files next to it.
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from overtone.diagnostics import load_traces
from overtone.report.figures import Bar, Shrink, avg_bars_figure, png, shrink_figure, trace_figures
from overtone.report.runs import Inputs, Pair, RunInfo, collect, model_name, pair_runs
from overtone.report.tables import (
    TEACHER_FORCED,
    WILD,
    PaperTable,
    ability_curve_table,
    ability_rows,
    ability_table,
    ablation_tables,
    continual_tables,
    dataset_name,
    editor_name,
    gain_table,
    lifelong_curve_table,
    lifelong_table,
    markdown_text,
    method_label,
    retention_tables,
    runs_table,
    single_editing_table,
    stream_of,
    to_markdown,
    token_table,
    trace_summary_table,
    wild_detail_table,
)
from overtone.version import __version__

log = logging.getLogger(__name__)
HTML_FILE = "report.html"
MARKDOWN_FILE = "report.md"
FIGURE_DIR = "figures"

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 1.5em 1.2em 4em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
.meta, .note, figcaption { color: #555; font-size: 0.9em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 1em 0 0.3em; font-size: 0.88em; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 0.3em; }
th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #e3e3e3; text-align: right; white-space: nowrap; }
thead th { border-bottom: 2px solid #999; text-align: center; }
tbody th { text-align: left; font-weight: normal; }
tr.section th { background: #f2f2f2; font-style: italic; text-align: left; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
.scroll { overflow-x: auto; }
"""


@dataclass
class FigurePng:
    name: str  # file stem, unique within the report
    caption: str
    data: bytes


@dataclass
class Section:
    anchor: str
    title: str
    intro: str = ""
    items: list[PaperTable | FigurePng] = field(default_factory=list)


@dataclass
class ReportFiles:
    html: Path
    markdown: Path
    figures: list[Path]


def _bars(runs: Sequence[RunInfo], pairs: Sequence[Pair]) -> list[Bar]:
    """Fig. 3 slots: every CE/OverTone pair, and every unpaired CE or OverTone run on its own."""
    bars: list[tuple[Bar, RunInfo]] = []
    paired: set[Path] = set()

    def slot(run: RunInfo, tag: str, ce: float | None, overtone: float | None) -> tuple[Bar, RunInfo]:
        series = editor_name(run.editor) + (f" ({tag})" if tag else "")
        return Bar(f"{dataset_name(run.dataset)}, {run.model}", run.sequence, series, ce, overtone), run

    for p in pairs:
        bars.append(slot(p.ce, p.overtone.tag, p.ce_summary.get("avg"), p.overtone_summary.get("avg")))
        paired |= {p.ce.path, p.overtone.path}
    for run in runs:
        if run.path not in paired and run.objective in ("CE", "OverTone") and run.summary.get("avg") is not None:
            avg = run.summary["avg"]
            bars.append(slot(run, run.tag, avg if run.objective == "CE" else None,
                             avg if run.objective == "OverTone" else None))
    seen: dict[tuple[str, int, str], int] = {}
    out = []
    for bar, run in bars:  # two bars in one slot (e.g. single and continual T=1) are told apart by directory
        key = (bar.panel, bar.sequence, bar.series)
        seen[key] = seen.get(key, 0) + 1
        out.append(bar if seen[key] == 1 else Bar(bar.panel, bar.sequence, f"{bar.series} [{run.path.name}]",
                                                  bar.ce, bar.overtone))
    return out


def _figure(name: str, caption: str, figure) -> FigurePng:
    return FigurePng(name, caption, png(figure))


def _wild_section(runs: Sequence[RunInfo]) -> Section | None:
    """Runs evaluated with both protocols: the wild scores and costs, and how much the numbers shrink."""
    both = [r for r in runs if {TEACHER_FORCED, WILD} <= set(r.protocols)]
    if not both:
        return None
    label = {r.path: f"{method_label(r)}, {dataset_name(r.dataset)}, T={r.sequence}" for r in both}
    items: list[PaperTable | FigurePng] = []
    detail = wild_detail_table([(label[r.path], r.summary) for r in both])
    if detail:
        items.append(detail)
    shrinks = [Shrink(f"{dataset_name(r.dataset)}, {r.model}, T={r.sequence}", method_label(r), r.summary,
                      r.summary[WILD]) for r in both]
    items.append(_figure("wild_shrink", "Teacher-forced (outline) and wild (filled) metrics of each method; "
                         "labels: wild minus teacher-forced (points).", shrink_figure(shrinks)))
    return Section("wild", "Teacher forcing against evaluation in the wild",
                   "The same edits scored twice: with the target's tokens given (teacher-forced token accuracy) "
                   "and with the model generating its answer from the bare prompt (exact match; Loc.: the same "
                   "normalised reply as the unedited model). docs/wild.md has the rules.", items)


def _lifelong_section(runs: Sequence[RunInfo]) -> Section | None:
    """The edit streams' lifelong metrics, their curves and their final scores by the age of the edit."""
    labelled = [(f"{method_label(r)}, {dataset_name(r.dataset)}, {r.sequence} edits", r) for r in runs
                if r.summary.get("lifelong")]
    rows = [(label, r.summary) for label, r in labelled]
    streams = [s for label, r in labelled for s in stream_of(label, r.config, r.records)]
    tables = [t for t in (lifelong_table(rows), lifelong_curve_table(rows), *retention_tables(streams)) if t]
    return Section("lifelong", "Lifelong editing", "Edit streams (--stream): every edit scored once on the final "
                   "model, the lifelong metrics of docs/lifelong-streams.md beside the teacher-forced ones.",
                   tables) if tables else None


def build_sections(inputs: Inputs, max_heatmaps: int = 12,
                   protocols: tuple[str, ...] = (TEACHER_FORCED, WILD)) -> list[Section]:
    """The report's sections; ``protocols`` chooses which evaluation protocols' numbers the tables show."""
    sections: list[Section] = []
    runs = inputs.runs
    if runs:
        views = [v for r in runs for v in r.views(protocols)]
        pairs = pair_runs(views)
        sections.append(Section("runs", "Runs", "Every input run directory, in the order given.", [runs_table(runs)]))
        paper = [t for t in (single_editing_table(views), *continual_tables(views), *ablation_tables(views)) if t]
        if paper:
            sections.append(Section("tables", "Tables in the paper's layout", "", paper))
        results: list[PaperTable | FigurePng] = []
        table = gain_table(pairs)
        if table:
            results.append(table)
        tf_pairs = [p for p in pairs if p.ce.evaluation == TEACHER_FORCED]
        bars = _bars([r for r in runs if TEACHER_FORCED in r.protocols], tf_pairs) if TEACHER_FORCED in protocols \
            else []
        if bars:
            results.append(_figure("fig3_avg_bars", "Fig. 3: teacher-forced Avg. per editor and sequence length T; "
                                   "solid bars: CE, dashed boxes: with OverTone, labels: OverTone minus CE (points).",
                                   avg_bars_figure(bars)))
        if results:
            sections.append(Section("gains", "OverTone against cross-entropy", "", results))
        wild = _wild_section(runs) if set(protocols) >= {TEACHER_FORCED, WILD} else None
        if wild:
            sections.append(wild)
        measured = ability_rows(runs)
        ability = [t for t in (ability_table(measured), ability_curve_table(measured)) if t]
        if ability:
            sections.append(Section("ability", "General ability during continual editing",
                                    "Held-out perplexity and general facts after each chunk's edits, against the "
                                    "unedited model (docs/wild.md).", ability))
        lifelong = _lifelong_section(runs)
        if lifelong:
            sections.append(lifelong)
    for i, path in enumerate(inputs.traces):
        meta, traces = load_traces(path)
        cases = list(dict.fromkeys(t.case_id for t in traces))
        dataset = dataset_name((meta.get("dataset") or {}).get("name", "-"))
        methods = ", ".join(dict.fromkeys(f"{editor_name(t.editor_name)} + {t.label}" for t in traces))
        intro = f"{path}: {len(cases)} case(s) of {dataset} edited with {methods} on {model_name(meta.get('model'))}."
        if len(cases) > max_heatmaps:
            intro += f" Heat maps for the first {max_heatmaps} cases."
        items: list[PaperTable | FigurePng] = [
            _figure(f"trace{i + 1}_{stem}", caption, fig) for stem, caption, fig in trace_figures(traces, max_heatmaps)
        ]
        items += [trace_summary_table(traces), token_table(traces)]
        sections.append(Section(f"trace{i + 1}", f"Token-level trace {i + 1}", intro, items))
    return sections


# ---- HTML --------------------------------------------------------------------------------------------------


def table_html(table: PaperTable) -> str:
    e = html.escape
    grouped = any(g for g, _ in table.groups)
    head = []
    if grouped:
        head.append(f'<tr><th rowspan="2">{e(table.stub)}</th>'
                    + "".join(f'<th colspan="{len(cols)}">{e(g)}</th>' for g, cols in table.groups) + "</tr>")
        head.append("<tr>" + "".join(f"<th>{e(c)}</th>" for _, cols in table.groups for c in cols) + "</tr>")
    else:
        head.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in table.headers) + "</tr>")
    body = []
    width = len(table.headers)
    for label, rows in table.sections:
        if label and len(table.sections) > 1:
            body.append(f'<tr class="section"><th colspan="{width}">{e(label)}</th></tr>')
        for row in rows:
            body.append(f'<tr><th scope="row">{e(row[0])}</th>' + "".join(f"<td>{e(c)}</td>" for c in row[1:])
                        + "</tr>")
    caption = f"<caption>{e(table.title)}</caption>" if table.title else ""
    note = f'<p class="note">{e(table.caption)}</p>' if table.caption else ""
    return (f'<div class="scroll"><table>{caption}<thead>{"".join(head)}</thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>{note}')


def figure_html(figure: FigurePng) -> str:
    data = base64.b64encode(figure.data).decode("ascii")
    caption = html.escape(figure.caption)
    return (f'<figure id="{html.escape(figure.name)}"><img src="data:image/png;base64,{data}" alt="{caption}">'
            f"<figcaption>{caption}</figcaption></figure>")


def render_html(title: str, sections: Sequence[Section], sources: Sequence[Path]) -> str:
    e = html.escape
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{STYLE}</style></head><body><main>",
        f"<h1>{e(title)}</h1>",
        f'<p class="meta">overtone {e(__version__)}, generated {e(stamp)} from '
        f"{e(', '.join(str(s) for s in sources))}</p>",
        "<nav>" + "".join(f'<a href="#{e(s.anchor)}">{e(s.title)}</a>' for s in sections) + "</nav>",
    ]
    for section in sections:
        parts.append(f'<section id="{e(section.anchor)}"><h2>{e(section.title)}</h2>')
        if section.intro:
            parts.append(f"<p>{e(section.intro)}</p>")
        for item in section.items:
            parts.append(table_html(item) if isinstance(item, PaperTable) else figure_html(item))
        parts.append("</section>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def render_markdown(title: str, sections: Sequence[Section], sources: Sequence[Path]) -> str:
    """The Markdown twin of the page; every title, name and caption is escaped (``markdown_text``), as the HTML is."""
    m = markdown_text
    parts = [f"# {m(title)}", "", m(f"overtone {__version__}, from {', '.join(str(s) for s in sources)}"), ""]
    for section in sections:
        parts += [f"## {m(section.title)}", ""]
        if section.intro:
            parts += [m(section.intro), ""]
        for item in section.items:
            if isinstance(item, PaperTable):
                parts += [to_markdown(item), ""]
            else:
                parts += [f"![{m(item.caption)}]({FIGURE_DIR}/{item.name}.png)", "", f"*{m(item.caption)}*", ""]
    return "\n".join(parts)


def write_report(paths: Sequence[Path], out: Path, title: str = "overtone report",
                 protocols: tuple[str, ...] = (TEACHER_FORCED, WILD)) -> ReportFiles:
    """Read ``paths`` (runs, traces or folders of them) and write report.html, report.md and figures/ in ``out``."""
    inputs = collect(list(paths))
    sections = build_sections(inputs, protocols=protocols)
    out.mkdir(parents=True, exist_ok=True)
    (out / FIGURE_DIR).mkdir(exist_ok=True)
    figures = []
    for section in sections:
        for item in section.items:
            if isinstance(item, FigurePng):
                path = out / FIGURE_DIR / f"{item.name}.png"
                path.write_bytes(item.data)
                figures.append(path)
    html_path, md_path = out / HTML_FILE, out / MARKDOWN_FILE
    html_path.write_text(render_html(title, sections, paths), encoding="utf-8")
    md_path.write_text(render_markdown(title, sections, paths), encoding="utf-8")
    log.info("report: %d runs, %d traces, %d figures", len(inputs.runs), len(inputs.traces), len(figures))
    return ReportFiles(html_path, md_path, figures)
