"""``overtone ablate`` and ``overtone sweep``: variants of one editor on the same cases, compared to CE.

Both build a study (study/spec.py) of one editor's rows and run it like ``overtone study run``: one
runner, the same executors (``--executor ray``), one run directory per row, resumable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from overtone.cli.app import app
from overtone.cli.common import console, fail, log, setup, specified
from overtone.cli.options import (
    DatasetOpt,
    EditorOpt,
    EditorOptions,
    EvalOptions,
    ExecutionOptions,
    LimitOpt,
    ModelOptions,
    OffsetOpt,
    OptionGroup,
    OverToneOptions,
    ParallelOpt,
    SeedOpt,
    SetOpt,
    VerboseOpt,
    grouped,
)
from overtone.cli.study import load, run_study_cli

DEV_OFFSET = 1000  # ZsRE records from here on are the development slice: tune there, report below it


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{option} takes comma-separated numbers, got {text!r}")


Result = tuple[str, dict[str, Any], list[dict[str, Any]]]


@dataclass(frozen=True)
class VariantOptions(OptionGroup):
    """What ``ablate`` and ``sweep`` take after the model: the editor's settings, the evaluation, how many cases
    are edited side by side, the seed, where the study runs, and the logging."""

    editing: EditorOptions = field(default_factory=EditorOptions)
    settings: SetOpt = None
    scoring: EvalOptions = field(default_factory=EvalOptions)
    parallel: ParallelOpt = "1"
    seed: SeedOpt = 0
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)
    verbose: VerboseOpt = False


def _run_variants(out: Path, editor: str, variants: dict[str, Any], model: ModelOptions, dataset: str, offset: int,
                  limit: int | None, overtone: OverToneOptions,
                  options: VariantOptions) -> tuple[list[Any], dict[str, Result]]:
    """Build the study of one editor's variants on the same cases, run it into ``out``, and return its cells
    and, by cell id, the (label, summary, records) of every cell that ran."""
    from overtone.runner import read_run

    study = load({
        "name": f"{editor}-{next(iter(variants))}",
        "fixed": {**asdict(model), "dataset": dataset, "offset": offset, "limit": limit, "seed": options.seed,
                  "editor": editor, "variant": [variants], **asdict(options.scoring),
                  "parallel": options.parallel},
        "editors": {editor: {"settings": specified(lambda: options.editing.settings(editor, options.settings)),
                             "overtone": overtone.given()}},
    })
    scheduler = run_study_cli(study, out, options.execution)
    failed = [s for s in scheduler.cells.values() if s.status == "failed"]
    if failed:
        fail(f"{failed[0].cell.name}: {failed[0].message}")
    results = {}
    for cell in study.cells:
        if scheduler.cells[cell.id].status == "done":
            _, records, summary = read_run(out / cell.name)
            results[cell.id] = (cell.variant.label, summary, records)
    return study.cells, results


def _report(results: list[Result], out: Path, title: str, matched: list[tuple[Result, Result]] = ()) -> None:
    """The summary table, the paired differences to CE, each early-stopping OverTone row against CE
    trained for the same number of updates on every case, and the wild scores and cost when measured."""
    from overtone.report import (
        extra_tables,
        markdown_table,
        markdown_text,
        paired_markdown,
        paired_table,
        summary_table,
        to_markdown,
    )
    from overtone.report.tables import to_rich

    rows = [(label, summary) for label, summary, _ in results]
    console.print(summary_table(rows, title=title))
    console.print(paired_table(results, base=0, title="paired differences to CE (x100)"))
    text = (f"{markdown_text(title)}\n\n{markdown_table(rows)}\n\nPaired differences to CE (x100):\n\n"
            f"{paired_markdown(results)}\n")
    for control, source in matched:
        heading = f"paired differences of {source[0]} to {control[0]} (x100)"
        console.print(paired_table([control, source], base=0, title=heading))
        text += f"\n{markdown_text(heading[0].upper() + heading[1:])}:\n\n{paired_markdown([control, source])}\n"
    for extra in extra_tables(rows):
        console.print(to_rich(extra))
        text += f"\n{to_markdown(extra)}\n"
    (out / "table.md").write_text(text)
    console.print(f"runs in {out}/, tables in {out / 'table.md'}", markup=False)


@app.command()
@grouped
def ablate(
    *,
    out: Annotated[Path, typer.Option("--out", help="parent directory of the variant runs (resumable)")],
    editor: EditorOpt = "lora",
    dataset: DatasetOpt = "zsre",
    limit: LimitOpt = 50,
    offset: OffsetOpt = 0,
    stop_grid: Annotated[str, typer.Option(
        "--stop-grid", help="also CE stopped early at these loss thresholds (judged on the objective's loss)")] = "",
    chk_lambda: Annotated[float, typer.Option(
        "--chk-lambda", min=0.0, max=1.0,
        help="when the editor's lambda leaves the mode check nothing to do (above 0.5, or 0.5 with tie=mix), "
             "also run OverTone and w/o chk at this lambda")] = 0.1,
    model: ModelOptions,
    overtone: OverToneOptions,
    options: VariantOptions,
) -> None:
    """The paper's ablation (Table 4.4) in the host editor's loop, with this project's controls.

    Rows: CE, OverTone, w/o clip, w/o dyn, w/o chk, w/o flt; OverTone stopped once every token is
    clipped; the paper's silent choices flipped (ties keep the mixture, clipped tokens count zero, the clip
    tests p(label)); OverTone and w/o chk at --chk-lambda when the mode check cannot act at the editor's lambda;
    CE with the loss thresholds of --stop-grid; and "CE, steps of <row>" (CE trained on each case for
    exactly as many updates as that row) for every OverTone row that stopped early. Paired statistics
    to CE, and of each early-stopping row to its matched-steps CE.
    """
    setup(model.threads, options.verbose)
    grid = _floats(stop_grid, "--stop-grid")
    cells, results = _run_variants(out, editor, {"ablation": {"stop_grid": grid, "chk_lambda": chk_lambda}}, model,
                                   dataset, offset, limit, overtone, options)
    rows = [results[c.id] for c in cells if c.id in results and not c.after]
    matched = [(results[c.id], results[c.after]) for c in cells if c.id in results and c.after]
    first = rows[0][1]
    _report(rows + [control for control, _ in matched], out,
            f"Ablation: {editor} on {dataset} cases {offset}..{offset + first['n_cases'] - 1}, {model.model}, "
            "single editing (x100)", matched)


@app.command()
@grouped
def sweep(
    *,
    out: Annotated[Path, typer.Option("--out", help="parent directory of the grid's runs (resumable)")],
    editor: EditorOpt = "ft-m",
    dataset: DatasetOpt = "zsre",
    limit: LimitOpt = 30,
    offset: Annotated[int, typer.Option("--offset", min=0, help="first case (ZsRE dev slice starts at 1000)")]
    = DEV_OFFSET,
    lambdas: Annotated[str, typer.Option("--lambdas", help="grid of lambda")] = "0.1,0.3,0.5",
    n_sigmas: Annotated[str, typer.Option("--n-sigmas", help="grid of n")] = "0.5,1,2",
    epsilons: Annotated[str, typer.Option("--epsilons", help="grid of epsilon")] = "0,0.01",
    ties: Annotated[str, typer.Option(
        "--ties", help="grid of the mode check's tie rule (fallback, mix); empty: the editor's default")] = "",
    model: ModelOptions,
    options: VariantOptions,
) -> None:
    """Tune OverTone's lambda, n and epsilon (and the tie rule) for one editor on a development slice, against CE.

    The table shows each grid point's activity: how often its target differed from CE's one-hot (mixed %)
    and how often a token was clipped."""
    setup(model.threads, options.verbose)
    if dataset == "zsre" and offset < DEV_OFFSET:
        log.warning("cases %d.. overlap the reported ZsRE slice (0..%d): tuned numbers there are not reportable",
                    offset, DEV_OFFSET - 1)
    grid = {"lambda": _floats(lambdas, "--lambdas"), "n_sigma": _floats(n_sigmas, "--n-sigmas"),
            "epsilon": _floats(epsilons, "--epsilons"), **({"tie": ties.split(",")} if ties else {})}
    cells, results = _run_variants(out, editor, {"sweep": grid}, model, dataset, offset, limit, OverToneOptions(),
                                   options)
    rows = [results[c.id] for c in cells if c.id in results]
    ranked = [rows[0], *sorted(rows[1:], key=lambda r: -(r[1].get("avg") or 0.0))]
    _report(ranked, out, f"Sweep: {editor} on {dataset} cases from {offset} ({rows[0][1]['n_cases']} cases), "
                         f"{model.model} (x100), best Avg. first")

