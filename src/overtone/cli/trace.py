"""``overtone trace``: edit cases with CE and with OverTone while recording per-token traces.

Each objective's edits are a run of the runner (runner/run.py) like ``bench``'s, with a ``TraceCollector``
watching every edit call: its records (scores, ``diverged``) go to the run directories ``ce/`` and
``overtone/`` in ``--out`` (written afresh: every case is edited again to be traced). Besides them, in
``--out``: ``trace.json`` (every trace, which ``overtone report`` reads back), ``fig1_probe_loss.png``
(paper Fig. 1), one ``fig2_ud_<case>.png`` per case (Fig. 2), and the per-token table as ``tokens.csv``
and ``tokens.md``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from overtone.cli.app import app
from overtone.cli.common import check_out, check_spec, console, execute, prepare_spec, setup, specified
from overtone.cli.options import (
    AblationOptions,
    DatasetOpt,
    EditorOpt,
    EditorOptions,
    EvalCacheOpt,
    ModelOptions,
    OffsetOpt,
    OverToneOptions,
    ParallelOpt,
    SeedOpt,
    StopLossOpt,
    VerboseOpt,
    grouped,
)

log = logging.getLogger(__name__)


def _fresh(run: Path) -> None:
    """Remove what an earlier trace wrote in run directory ``run``: a trace edits every case again."""
    from overtone.runner.store import CASES_FILE, CONFIG_FILE, SUMMARY_FILE

    old = [run / name for name in (CONFIG_FILE, CASES_FILE, SUMMARY_FILE) if (run / name).exists()]
    if old:
        log.info("%s: replacing the records of an earlier trace", run)
    for path in old:
        path.unlink()


def _write(out: Path, traces: list[Any], meta: dict[str, Any], n_cases: int) -> None:
    """``trace.json``, the figures and the per-token tables of ``traces``."""
    from overtone.diagnostics import TRACE_FILE, save_traces
    from overtone.report.figures import png, trace_figures
    from overtone.report.tables import to_markdown, to_rich, token_table, trace_summary_table, write_csv

    out.mkdir(parents=True, exist_ok=True)
    save_traces(out / TRACE_FILE, traces, meta)
    written = [out / TRACE_FILE]
    for stem, _caption, figure in trace_figures(traces, max_cases=n_cases):
        path = out / f"{stem}.png"
        path.write_bytes(png(figure))
        written.append(path)
    summary, tokens = trace_summary_table(traces), token_table(traces)
    write_csv(out / "tokens.csv", tokens)
    (out / "tokens.md").write_text(f"{to_markdown(summary)}\n\n{to_markdown(tokens)}\n", encoding="utf-8")
    written += [out / "tokens.csv", out / "tokens.md"]
    console.print(to_rich(summary))
    console.print("wrote " + ", ".join(str(p) for p in written), markup=False)


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
    eval_cache: EvalCacheOpt = True,
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Edit cases with CE and with OverTone, recording per-token UD and per-step probe losses; save plots.

    The records are scored and flagged like bench's (in --out/ce and --out/overtone). With --parallel B,
    B cases are edited at once, each on its own (the same traces)."""
    for objective in ("ce", "overtone"):  # a run another process writes is refused before any heavy import
        check_out(out / objective, resumed=False)
    from overtone.diagnostics import TraceCollector
    from overtone.runner.spec import RunSpec, overtone_for

    setup(model.threads, verbose)
    cfg = specified(lambda: overtone_for(editor, ablation.switches(), **overtone.given()))
    overrides = specified(lambda: tuple(editing.settings(editor, None, stop_loss=stop_loss).items()))
    specs = [specified(lambda objective=objective: RunSpec(
        editor=editor, objective=objective, dataset=dataset, offset=offset, limit=limit, model=model.model,
        device=model.device, dtype=model.dtype, threads=model.threads, overtone=cfg, settings=overrides,
        parallel=parallel, seed=seed, eval_cache=eval_cache)) for objective in ("ce", "overtone")]
    inputs = check_spec(specs[0])
    order = {case.case_id: i for i, case in enumerate(inputs.cases)}
    traces: list[Any] = []
    meta: dict[str, Any] = {}
    lm = None
    try:
        for spec in specs:
            prepared = prepare_spec(spec, inputs, lm)
            lm = prepared.lm
            meta = {key: prepared.config[key] for key in ("overtone_version", "code", "model")}
            meta["dataset"] = {"name": dataset, "offset": offset}
            run = out / spec.objective
            _fresh(run)
            collector = TraceCollector()
            try:
                execute(prepared, run, f"{editor}/{spec.objective}", observer=collector)
            finally:  # in case order (a parallel edit groups cases by length)
                traces += sorted(collector.traces, key=lambda t: order[t.case_id])
    finally:  # the traces recorded before an error are written too
        if traces:
            _write(out, traces, meta, len(inputs.cases))
