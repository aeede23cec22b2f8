"""The report's figures as matplotlib PNGs: probe losses per step (paper Fig. 1), the per-token
underfitting degree over steps (Fig. 2) and Avg. per editor and sequence length with OverTone's gain
(Fig. 3). Figures are built on ``matplotlib.figure.Figure`` directly, so no GUI backend or global
pyplot state is involved and the same code serves the CLI, the report and notebooks.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib import colormaps
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from overtone.diagnostics import CaseTrace
from overtone.report.tables import PROBE_NAMES

DPI = 110
OBJECTIVE_COLORS = {"CE": "#1f77b4", "OverTone": "#d62728"}
OTHER_COLORS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#ff7f0e")
UD_LABEL = r"UD $= \log p_0(g_i) - \log p_t(y_i)$ (nats)"


def literal(text: str) -> str:
    """Data text (prompts, tokens, run and dataset names) drawn as itself: with every ``$`` escaped matplotlib
    reads no mathtext in it, so ``$5 ... $10`` stays money and ``$\\nosuchcmd{ x$`` cannot abort the drawing."""
    return text.replace("$", r"\$")


def png(figure: Figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _color(label: str, labels: Sequence[str]) -> str:
    if label in OBJECTIVE_COLORS:
        return OBJECTIVE_COLORS[label]
    others = [x for x in labels if x not in OBJECTIVE_COLORS]
    return OTHER_COLORS[others.index(label) % len(OTHER_COLORS)]


def _labels(traces: Sequence[CaseTrace]) -> list[str]:
    order = {"CE": 0, "OverTone": 1}
    return sorted(dict.fromkeys(t.label for t in traces), key=lambda x: (order.get(x, 2), x))


def _carried(trace: CaseTrace, metric: str, last: int) -> list[float]:
    """Per step 0..last the probe loss, the last recorded value carried on after the edit stopped."""
    by_step = dict(zip(trace.steps, trace.probe_loss[metric], strict=True))
    out, current = [], float("nan")
    for step in range(last + 1):
        value = by_step.get(step)
        current = current if value is None else value
        out.append(current)
    return out


def probe_loss_figure(traces: Sequence[CaseTrace], metrics: Sequence[str] = ("gen", "por", "loc")) -> Figure:
    """Fig. 1: the loss of each probe kind's answer per optimisation step, one line per objective.

    With several cases the line is the mean over cases; a case that stopped early keeps its final
    value, since its weights no longer change.
    """
    metrics = [m for m in metrics if any(any(v is not None for v in t.probe_loss.get(m, [])) for t in traces)]
    if not metrics:
        raise ValueError("the traces hold no probe losses to plot")
    labels = _labels(traces)
    figure = Figure(figsize=(4.2 * len(metrics), 3.4), layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    cases = sorted({t.case_id for t in traces})
    for ax, metric in zip(axes, metrics, strict=True):
        usable = [t for t in traces if t.probe_loss.get(metric) and t.probe_loss[metric][0] is not None]
        before = [t.probe_loss[metric][0] for t in usable]
        ax.axhline(sum(before) / len(before), color="0.45", linestyle="--", linewidth=1, label="before editing")
        for label in labels:
            group = [t for t in usable if t.label == label]
            if not group:
                continue
            last = max(t.steps[-1] for t in group)
            series = [_carried(t, metric, last) for t in group]
            mean = [sum(col) / len(col) for col in zip(*series, strict=True)]
            ax.plot(range(last + 1), mean, color=_color(label, labels), marker="o", markersize=2.5, linewidth=1.6,
                    label=literal(label))
        ax.set_title(literal(PROBE_NAMES.get(metric, metric)))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimisation step (weight updates)")
        ax.set_ylabel("answer loss (nats per token)")
        ax.grid(alpha=0.3)
    axes[0].legend(frameon=False)
    figure.suptitle(_cases_title(traces, cases), fontsize=10)
    return figure


def _cases_title(traces: Sequence[CaseTrace], cases: Sequence[str]) -> str:
    if len(cases) == 1:
        t = traces[0]
        return literal(_shorten(f"{t.case_id}: {t.prompt} → {t.target}", 110))
    return f"mean over {len(cases)} cases"


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def ud_heatmap_figure(traces: Sequence[CaseTrace]) -> Figure:
    """Fig. 2 for one case: (a) each target token's loss before editing; (b) its UD at every step, per objective.

    Cells where the token was clipped (sent no gradient) carry an x; cells whose target was the
    smoothed mixture rather than the one-hot label carry a dot.
    """
    if not traces or len({t.case_id for t in traces}) != 1:
        raise ValueError("a heat map shows the traces of exactly one case")
    labels = _labels(traces)
    traces = sorted(traces, key=lambda t: labels.index(t.label))
    first = traces[0]
    n = len(first.tokens)
    values = [v for t in traces for row in t.ud for v in row]
    # Zero is white; each sign gets the full colour range, so small overfitting is as visible as the
    # large initial underfitting. The colour bar shows the two scales.
    norm = TwoSlopeNorm(vcenter=0.0, vmin=min(-1e-3, *values), vmax=max(1e-3, *values))
    widths = [1.3] + [max(2.5, 0.16 * len(t.steps)) for t in traces]
    figure = Figure(figsize=(sum(widths) + 1.8, max(3.2, 1.6 + 0.32 * n)), layout="constrained")
    axes = figure.subplots(1, 1 + len(traces), gridspec_kw={"width_ratios": widths}, squeeze=False)[0]
    ticks = [literal(f"{t!r} [g: {g!r}]") for t, g in zip(first.tokens, first.greedy_tokens, strict=True)]

    ax = axes[0]
    ax.barh(range(n), [-v for v in first.label_log_prob[0]], color="0.5")
    ax.set_yticks(range(n), ticks, fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlabel("NLL before (nats)")
    ax.set_title("(a) pre-edit loss", fontsize=9)

    cmap = colormaps["RdBu"]
    image = None
    for ax, trace in zip(axes[1:], traces, strict=True):
        grid = [[row[i] for row in trace.ud] for i in range(n)]
        image = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        for marks, marker, size in ((trace.clipped, "x", 18), (trace.mixed, ".", 14)):
            points = [(c, i) for c, row in enumerate(marks) for i in range(n) if row[i]]
            if points:
                ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, s=size, c="black",
                           linewidths=0.8)
        step_ticks = list(range(0, len(trace.steps), max(1, len(trace.steps) // 8)))
        ax.set_xticks(step_ticks, [str(trace.steps[c]) for c in step_ticks])
        ax.set_yticks(range(n), [""] * n)
        ax.set_xlabel("optimisation step (weight updates)")
        ax.set_title(literal(f"(b) UD, {trace.label}"), fontsize=9)
    figure.colorbar(image, ax=list(axes[1:]), label=UD_LABEL, shrink=0.95)
    handles = [Patch(color=cmap(0.1), label="UD < 0: overfitted"),
               Patch(color=cmap(0.9), label="UD > 0: underfitted"),
               Line2D([], [], marker="x", color="black", linestyle="", label="clipped (no gradient)"),
               Line2D([], [], marker=".", color="black", linestyle="", label="target = mixture")]
    figure.legend(handles=handles, loc="outside lower center", ncols=4, frameon=False, fontsize=8)
    figure.suptitle(literal(_shorten(f"{first.case_id}: {first.prompt} → {first.target}", 110)), fontsize=10)
    return figure


@dataclass(frozen=True)
class Bar:
    """One bar slot of Fig. 3: a panel (model and dataset), a sequence length, a method, two Avg. values."""

    panel: str
    sequence: int
    series: str
    ce: float | None
    overtone: float | None


def avg_bars_figure(bars: Sequence[Bar]) -> Figure:
    """Fig. 3: Avg. per editor and sequence length; solid = CE, dashed box = with OverTone.

    The part of the dashed box above the solid bar is OverTone's gain; a solid bar rising above its
    box is a loss. The difference is printed over each slot.
    """
    if not bars:
        raise ValueError("no runs to plot")
    panels = list(dict.fromkeys(b.panel for b in bars))
    series = list(dict.fromkeys(b.series for b in bars))
    palette = (OBJECTIVE_COLORS["CE"], *OTHER_COLORS)
    colors = {s: palette[i % len(palette)] for i, s in enumerate(series)}
    panel_width = max(4.5, 1.5 + 0.9 * len(series) * len({b.sequence for b in bars}))
    figure = Figure(figsize=(panel_width * len(panels) + 1.5, 3.8), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    width = min(0.35, 0.8 / len(series))
    for ax, panel in zip(axes, panels, strict=True):
        members = [b for b in bars if b.panel == panel]
        lengths = sorted({b.sequence for b in members})
        for b in members:
            x = lengths.index(b.sequence) + width * (series.index(b.series) - (len(series) - 1) / 2)
            color = colors[b.series]
            if b.ce is not None:
                ax.bar(x, b.ce, width * 0.9, color=color)
            if b.overtone is not None:
                ax.bar(x, b.overtone, width * 0.9, color=color, alpha=0.22)
                # a dark dashed outline stays visible where the box lies inside a taller solid bar (a loss)
                ax.bar(x, b.overtone, width * 0.9, fill=False, edgecolor="black", linestyle="--", linewidth=1.2)
            top = max(v for v in (b.ce, b.overtone) if v is not None)
            if b.ce is not None and b.overtone is not None:
                ax.text(x, top + 1, f"{b.overtone - b.ce:+.1f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(lengths)), [f"T={t}" for t in lengths])
        ax.set_xlim(-0.6, len(lengths) - 0.4)
        ax.set_ylim(0, 105)
        ax.set_xlabel("edits applied before evaluation (sequence length T)")
        ax.set_ylabel("Avg. of Rel., Gen., Por., Loc. (%)")
        ax.set_title(literal(panel), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=colors[s], label=literal(s)) for s in series]
    handles += [Patch(color="0.3", label="CE (solid)"),
                Patch(facecolor=(0.3, 0.3, 0.3, 0.22), edgecolor="black", linestyle="--",
                      label="+ OverTone (dashed box)")]
    figure.legend(handles=handles, loc="outside right center", frameon=False, fontsize=8)
    return figure


def trace_figures(traces: Sequence[CaseTrace], max_cases: int = 12) -> list[tuple[str, str, Figure]]:
    """(file stem, caption, figure) for Fig. 1 over all cases and Fig. 2 for each of the first ``max_cases``."""
    cases = list(dict.fromkeys(t.case_id for t in traces))
    out = [("fig1_probe_loss", "Fig. 1: loss of the probes' answers per optimisation step "
            f"({'mean over ' + str(len(cases)) + ' cases' if len(cases) > 1 else cases[0]}).",
            probe_loss_figure(traces))]
    for case in cases[:max_cases]:
        stem = "fig2_ud_" + "".join(c if c.isalnum() else "-" for c in case)
        out.append((stem, f"Fig. 2, case {case}: (a) pre-edit loss per target token; (b) underfitting degree per "
                          "token and step (red: overfitted).",
                    ud_heatmap_figure([t for t in traces if t.case_id == case])))
    return out


@dataclass(frozen=True)
class Shrink:
    """One method's metrics under both protocols, for the shrink figure (x100)."""

    panel: str  # dataset, model and sequence length
    series: str  # the method
    teacher_forced: dict[str, float | None]
    wild: dict[str, float | None]


SHRINK_METRICS = (("rel", "Rel."), ("gen", "Gen."), ("por", "Por."), ("loc", "Loc."), ("avg", "Avg."))


def shrink_figure(items: Sequence[Shrink]) -> Figure:
    """How much each method's numbers shrink from teacher forcing to generated answers.

    Per metric and method: an outlined bar up to the teacher-forced value, a filled bar up to the wild
    value inside it, and the difference (wild minus teacher-forced, points) above.
    """
    if not items:
        raise ValueError("no runs evaluated with both protocols")
    panels = list(dict.fromkeys(i.panel for i in items))
    series = list(dict.fromkeys(i.series for i in items))
    palette = (OBJECTIVE_COLORS["CE"], OBJECTIVE_COLORS["OverTone"], *OTHER_COLORS)
    colors = {s: palette[n % len(palette)] for n, s in enumerate(series)}
    metrics = [(m, h) for m, h in SHRINK_METRICS
               if any(i.teacher_forced.get(m) is not None and i.wild.get(m) is not None for i in items)]
    width = min(0.38, 0.8 / len(series))
    figure = Figure(figsize=(max(4.5, 0.5 + 0.55 * len(metrics) * len(series)) * len(panels) + 1.5, 3.8),
                    layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        for item in (i for i in items if i.panel == panel):
            offset = width * (series.index(item.series) - (len(series) - 1) / 2)
            color = colors[item.series]
            for x, (m, _) in enumerate(metrics):
                tf, wild = item.teacher_forced.get(m), item.wild.get(m)
                if tf is None or wild is None:
                    continue
                ax.bar(x + offset, tf, width * 0.9, fill=False, edgecolor=color, linewidth=1.4)
                ax.bar(x + offset, wild, width * 0.9, color=color)
                ax.text(x + offset, max(tf, wild) + 1, f"{wild - tf:+.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(metrics)), [h for _, h in metrics])
        ax.set_ylim(0, 110)
        ax.set_ylabel("x100")
        ax.set_title(literal(panel), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=colors[s], label=literal(s)) for s in series]
    handles += [Patch(fill=False, edgecolor="0.3", label="teacher-forced (outline)"),
                Patch(color="0.3", label="wild, exact match (filled)")]
    figure.legend(handles=handles, loc="outside right center", frameon=False, fontsize=8)
    return figure
