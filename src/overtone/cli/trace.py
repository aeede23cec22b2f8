"""``overtone trace``: edit cases with CE and with OverTone while recording per-token traces.

Writes, in ``--out``: ``trace.json`` (everything recorded, which ``overtone report`` reads back),
``fig1_probe_loss.png`` (paper Fig. 1), one ``fig2_ud_<case>.png`` per case (Fig. 2), and the
per-token table as ``tokens.csv`` and ``tokens.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from overtone.version import __version__
from overtone.cli.app import app
from overtone.cli.common import (
    AblationOptions,
    DatasetOpt,
    EditorOpt,
    EditorOptions,
    ModelOptions,
    OffsetOpt,
    OverToneOptions,
    ParallelOpt,
    SeedOpt,
    StopLossOpt,
    VerboseOpt,
    build,
    console,
    fail,
    grouped,
    overtone_config,
    parallel_option,
    setup,
)


@app.command()
@grouped
def trace(
    *,
    out: Annotated[Path, typer.Option("--out", help="output directory")] = Path("runs/trace"),
    dataset: DatasetOpt = "zsre",
    offset: OffsetOpt = 0,
    limit: Annotated[int, typer.Option("--limit", min=1, help="number of cases, each edited on its own")] = 1,
    editor: EditorOpt = "ft-m",
    model: ModelOptions,
    overtone: OverToneOptions,
    ablation: AblationOptions,
    editing: EditorOptions,
    stop_loss: StopLossOpt = None,
    parallel: ParallelOpt = "1",
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Edit cases with CE and with OverTone, recording per-token UD and per-step probe losses; save plots.

    With --parallel B, B cases are edited at once, each on its own (the same traces)."""
    from overtone.benchmarks import DatasetError, load_benchmark
    from overtone.diagnostics import TRACE_FILE, TraceError, save_traces, trace_edit, trace_parallel
    from overtone.editors import EditError
    from overtone.editors.parallel import parallel_size
    from overtone.evaluation import Evaluator
    from overtone.report.figures import png, trace_figures
    from overtone.report.tables import to_markdown, to_rich, token_table, trace_summary_table, write_csv

    setup(model.threads, seed, verbose)
    cases_at_once = parallel_option(parallel, editor)
    cfg = overtone_config(editor, overtone, ablation)
    settings = editing.settings(editor, None, stop_loss=stop_loss)
    try:
        cases = load_benchmark(dataset, limit=limit, offset=offset)
    except DatasetError as exc:
        fail(str(exc))
    if not cases:
        fail(f"dataset {dataset!r} has no case at offset {offset}")
    lm, traces, error = None, [], None
    for objective in ("ce", "overtone"):
        lm, ed = build(model, editor, objective, cfg, settings, lm)
        evaluator = Evaluator(lm)
        if cases_at_once == "auto":
            cases_at_once = parallel_size(ed.case_memory(), lm.device, len(cases))
        size = int(cases_at_once)
        for first in range(0, len(cases), size):
            group = cases[first: first + size]
            try:
                traces += trace_edit(ed, evaluator, group) if size == 1 else trace_parallel(ed, evaluator, group)
            except (EditError, TraceError, ValueError) as exc:
                error = f"{editor} + {objective}, case {', '.join(c.case_id for c in group)}: {exc}"
                break
        if error:
            break
    if not traces:
        fail(str(error))
    out.mkdir(parents=True, exist_ok=True)
    meta = {"overtone_version": __version__, "model": lm.identity, "dataset": {"name": dataset, "offset": offset}}
    save_traces(out / TRACE_FILE, traces, meta)
    written = [out / TRACE_FILE]
    for stem, _caption, figure in trace_figures(traces, max_cases=len(cases)):
        path = out / f"{stem}.png"
        path.write_bytes(png(figure))
        written.append(path)
    summary, tokens = trace_summary_table(traces), token_table(traces)
    write_csv(out / "tokens.csv", tokens)
    (out / "tokens.md").write_text(f"{to_markdown(summary)}\n\n{to_markdown(tokens)}\n", encoding="utf-8")
    written += [out / "tokens.csv", out / "tokens.md"]
    console.print(to_rich(summary))
    console.print("wrote " + ", ".join(str(p) for p in written))
    if error:
        fail(f"{error}; the {len(traces)} trace(s) recorded before it are saved in {out}")
