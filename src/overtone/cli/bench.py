"""``overtone bench``, ``demo`` and ``table``: benchmark runs and their summaries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from overtone.cli.app import app
from overtone.cli.common import (
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    EditorOpt,
    EpsilonOpt,
    LambdaOpt,
    LayerOpt,
    LimitOpt,
    LrOpt,
    ModelOpt,
    NoCheckOpt,
    NoClipOpt,
    NoFilterOpt,
    NSigmaOpt,
    ObjectiveOpt,
    OffsetOpt,
    SeedOpt,
    SetOpt,
    StaticOpt,
    StepsOpt,
    StopLossOpt,
    ThreadsOpt,
    VerboseOpt,
    build,
    console,
    editor_settings,
    fail,
    overtone_config,
    run_bench,
    setup,
)


@app.command()
def bench(
    out: Annotated[Path, typer.Option("--out", help="run directory (resumed if it exists)")],
    editor: EditorOpt = "ft-m",
    objective: ObjectiveOpt = "overtone",
    dataset: DatasetOpt = "zsre",
    limit: LimitOpt = None,
    offset: OffsetOpt = 0,
    model: ModelOpt = "smollm2-135m",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    threads: ThreadsOpt = 1,
    lam: LambdaOpt = None,
    n_sigma: NSigmaOpt = None,
    epsilon: EpsilonOpt = None,
    no_clip: NoClipOpt = False,
    static_target: StaticOpt = False,
    no_mode_check: NoCheckOpt = False,
    no_filter: NoFilterOpt = False,
    layer: LayerOpt = None,
    lr: LrOpt = None,
    steps: StepsOpt = None,
    stop_loss: StopLossOpt = None,
    settings: SetOpt = None,
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Single editing over a benchmark: edit each case from the unedited model, evaluate, revert."""
    from overtone.report import summary_table

    setup(threads, seed, verbose)
    cfg = overtone_config(lam, n_sigma, epsilon, no_clip, static_target, no_mode_check, no_filter)
    named = {"layer": layer, "lr": lr, "steps": steps, "stop_loss": stop_loss}
    lm, ed = build(model, device, dtype, editor, objective, cfg, editor_settings(named, settings))
    summary = run_bench(lm, ed, dataset, offset, limit, out, seed, threads, f"{editor}/{objective}")
    console.print(summary_table([(f"{editor} {objective}", summary)], title=f"{dataset}, {model}"))
    console.print(f"results in {out}")


@app.command()
def demo(
    limit: LimitOpt = 40,
    out: Annotated[Path, typer.Option("--out", help="parent directory of the two runs")] = Path("runs/demo"),
    editor: EditorOpt = "ft-m",
    dataset: DatasetOpt = "zsre",
    model: ModelOpt = "smollm2-135m",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    threads: ThreadsOpt = 1,
    lam: LambdaOpt = None,
    n_sigma: NSigmaOpt = None,
    epsilon: EpsilonOpt = None,
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Edit the same cases with cross-entropy and with OverTone and print the two side by side."""
    from overtone.report import markdown_table, summary_table

    setup(threads, seed, verbose)
    cfg = overtone_config(lam, n_sigma, epsilon, False, False, False, False)
    rows = []
    lm = None
    for objective in ("ce", "overtone"):
        lm, ed = build(model, device, dtype, editor, objective, cfg, {}, lm)
        summary = run_bench(lm, ed, dataset, 0, limit, out / f"{editor}-{objective}", seed, threads,
                             f"{editor}/{objective}")
        rows.append((f"{editor} + {'CE' if objective == 'ce' else 'OverTone'}", summary))
    console.print(summary_table(rows, title=f"{dataset}, first {limit} cases, {model}, single editing (x100)",
                                caption=f"OverTone λ={cfg.lam} n={cfg.n_sigma} ε={cfg.epsilon}"))
    (out / "table.md").write_text(markdown_table(rows) + "\n")
    console.print(f"runs in {out}/, Markdown table in {out / 'table.md'}")


@app.command()
def table(
    runs: Annotated[list[Path], typer.Argument(help="run directories")],
    markdown: Annotated[bool, typer.Option("--markdown", help="print GitHub Markdown")] = False,
) -> None:
    """Print the summary table of finished (or partial) runs."""
    from overtone.report import markdown_table, summary_table
    from overtone.runner import StoreError, read_run, summarize

    rows = []
    for run in runs:
        try:
            config, cases, summary = read_run(run)
        except StoreError as exc:
            fail(str(exc))
        objective = config.get("objective") or {}
        rows.append((f"{run.name} ({objective.get('name', '-')})", summary or summarize(cases)))
    if markdown:
        console.print(markdown_table(rows), markup=False)
    else:
        console.print(summary_table(rows))


