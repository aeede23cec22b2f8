"""``overtone ablate`` and ``overtone sweep``: variants of one editor on the same cases, compared to CE."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from overtone.cli.app import app
from overtone.cli.common import (
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    EditorOpt,
    EpsilonOpt,
    EvalContextOpt,
    EvalOpt,
    LambdaOpt,
    LayerOpt,
    LimitOpt,
    LrOpt,
    ModelOpt,
    NSigmaOpt,
    OffsetOpt,
    ParallelOpt,
    SeedOpt,
    SetOpt,
    StepsOpt,
    ThreadsOpt,
    VerboseOpt,
    build,
    console,
    editor_settings,
    fail,
    log,
    overtone_config,
    parallel_option,
    precheck,
    run_bench,
    setup,
)

DEV_OFFSET = 1000  # ZsRE records from here on are the development slice: tune there, report below it


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{option} takes comma-separated numbers, got {text!r}")


Result = tuple[str, dict[str, Any], list[dict[str, Any]]]


def _run_variants(variants: list[Any], out: Path, model: str, device: str, dtype: str, editor: str,
                  dataset: str, offset: int, limit: int | None, settings: dict[str, Any], seed: int,
                  threads: int, lm: Any = None, evaluation: str = "teacher-forced",
                  eval_context: str = "bare", parallel: int | str = 1) -> tuple[list[Result], Any]:
    """Run every variant into ``out/<slug>``; a matched-steps variant reads its budgets from its source's run."""
    from overtone.runner import read_run
    from overtone.runner.variants import step_budgets

    inputs = precheck(model, editor, settings, dataset, offset, limit, parallel, seed=seed, evaluation=evaluation,
                      eval_context=eval_context)  # before the model is loaded
    results = []
    for v in variants:
        lm, ed = build(model, device, dtype, editor, v.objective, v.overtone, {**settings, **v.editor_settings}, lm)
        budgets = step_budgets(read_run(out / v.match_steps)[1]) if v.match_steps else None
        summary = run_bench(lm, ed, dataset, offset, limit, out / v.slug, seed, threads, f"{editor} {v.label}",
                            step_budgets=budgets, matched=v.match_steps, inputs=inputs, parallel=parallel)
        results.append((v.label, summary, read_run(out / v.slug)[1]))
    return results, lm


def _report(results: list[Result], out: Path, title: str, matched: list[tuple[Result, Result]] = ()) -> None:
    """The summary table, the paired differences to CE, each early-stopping OverTone row against CE
    trained for the same number of updates on every case, and the wild scores and cost when measured."""
    from overtone.report import extra_tables, markdown_table, paired_markdown, paired_table, summary_table, to_markdown
    from overtone.report.tables import to_rich

    rows = [(label, summary) for label, summary, _ in results]
    console.print(summary_table(rows, title=title))
    console.print(paired_table(results, base=0, title="paired differences to CE (x100)"))
    text = f"{title}\n\n{markdown_table(rows)}\n\nPaired differences to CE (x100):\n\n{paired_markdown(results)}\n"
    for control, source in matched:
        heading = f"paired differences of {source[0]} to {control[0]} (x100)"
        console.print(paired_table([control, source], base=0, title=heading))
        text += f"\n{heading[0].upper()}{heading[1:]}:\n\n{paired_markdown([control, source])}\n"
    for extra in extra_tables(rows):
        console.print(to_rich(extra))
        text += f"\n{to_markdown(extra)}\n"
    (out / "table.md").write_text(text)
    console.print(f"runs in {out}/, tables in {out / 'table.md'}")


@app.command()
def ablate(
    out: Annotated[Path, typer.Option("--out", help="parent directory of the variant runs (resumable)")],
    editor: EditorOpt = "lora",
    dataset: DatasetOpt = "zsre",
    limit: LimitOpt = 50,
    offset: OffsetOpt = 0,
    stop_grid: Annotated[str, typer.Option(
        "--stop-grid", help="also CE stopped early at these loss thresholds (judged on the objective's loss)")] = "",
    chk_lambda: Annotated[float, typer.Option(
        "--chk-lambda", min=0.0, max=1.0,
        help="when the editor's lambda leaves the mode check nothing to do (>= 0.5), also run OverTone and "
             "w/o chk at this lambda")] = 0.1,
    model: ModelOpt = "smollm2-135m",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    threads: ThreadsOpt = 1,
    lam: LambdaOpt = None,
    n_sigma: NSigmaOpt = None,
    epsilon: EpsilonOpt = None,
    layer: LayerOpt = None,
    lr: LrOpt = None,
    steps: StepsOpt = None,
    settings: SetOpt = None,
    evaluation: EvalOpt = "teacher-forced",
    eval_context: EvalContextOpt = "bare",
    parallel: ParallelOpt = "1",
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
) -> None:
    """The paper's ablation (Table 4.4) in the host editor's loop, with this project's controls.

    Rows: CE, OverTone, w/o clip, w/o dyn, w/o chk, w/o flt; OverTone stopped once every token is
    clipped; OverTone and w/o chk at --chk-lambda when the mode check cannot act at the editor's lambda;
    CE with the loss thresholds of --stop-grid; and "CE, steps of <row>" (CE trained on each case for
    exactly as many updates as that row) for every OverTone row that stopped early. Paired statistics
    to CE, and of each early-stopping row to its matched-steps CE.
    """
    from overtone.editors import EDITORS
    from overtone.runner.variants import ablation_variants, matched_steps_variants

    setup(threads, seed, verbose)
    if editor not in EDITORS:
        fail(f"unknown editor {editor!r}; available: {', '.join(sorted(EDITORS))}")
    cases_at_once = parallel_option(parallel, editor)
    # a control equal to the editor's own stop rule would repeat the CE row
    default_stop = getattr(EDITORS[editor].config_class(), "stop_loss", None)
    grid = [t for t in _floats(stop_grid, "--stop-grid") if t != default_stop]
    variants = ablation_variants(overtone_config(editor, lam, n_sigma, epsilon), grid, chk_lambda)
    overrides = editor_settings(editor, settings, layer=layer, lr=lr, steps=steps)
    results, lm = _run_variants(variants, out, model, device, dtype, editor, dataset, offset, limit, overrides,
                                seed, threads, None, evaluation, eval_context, cases_at_once)
    by_slug = {v.slug: r for v, r in zip(variants, results, strict=True)}
    controls = matched_steps_variants(variants, {slug: r[2] for slug, r in by_slug.items()})
    matched_results, _ = _run_variants(controls, out, model, device, dtype, editor, dataset, offset, limit,
                                       overrides, seed, threads, lm, evaluation, eval_context, cases_at_once)
    matched = [(r, by_slug[v.match_steps]) for v, r in zip(controls, matched_results, strict=True)]
    first = results[0][1]
    _report(results + matched_results, out,
            f"Ablation: {editor} on {dataset} cases {offset}..{offset + first['n_cases'] - 1}, {model}, "
            "single editing (x100)", matched)


@app.command()
def sweep(
    out: Annotated[Path, typer.Option("--out", help="parent directory of the grid's runs (resumable)")],
    editor: EditorOpt = "ft-m",
    dataset: DatasetOpt = "zsre",
    limit: LimitOpt = 30,
    offset: Annotated[int, typer.Option("--offset", min=0, help="first case (ZsRE dev slice starts at 1000)")]
    = DEV_OFFSET,
    lambdas: Annotated[str, typer.Option("--lambdas", help="grid of lambda")] = "0.1,0.3,0.5",
    n_sigmas: Annotated[str, typer.Option("--n-sigmas", help="grid of n")] = "0.5,1,2",
    epsilons: Annotated[str, typer.Option("--epsilons", help="grid of epsilon")] = "0,0.01",
    model: ModelOpt = "smollm2-135m",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    threads: ThreadsOpt = 1,
    layer: LayerOpt = None,
    lr: LrOpt = None,
    steps: StepsOpt = None,
    settings: SetOpt = None,
    evaluation: EvalOpt = "teacher-forced",
    eval_context: EvalContextOpt = "bare",
    parallel: ParallelOpt = "1",
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Tune OverTone's lambda, n and epsilon for one editor on a development slice, against CE."""
    from overtone.runner.variants import sweep_variants

    setup(threads, seed, verbose)
    cases_at_once = parallel_option(parallel, editor)
    if dataset == "zsre" and offset < DEV_OFFSET:
        log.warning("cases %d.. overlap the reported ZsRE slice (0..%d): tuned numbers there are not reportable",
                    offset, DEV_OFFSET - 1)
    variants = sweep_variants(overtone_config(editor), _floats(lambdas, "--lambdas"),
                              _floats(n_sigmas, "--n-sigmas"), _floats(epsilons, "--epsilons"))
    overrides = editor_settings(editor, settings, layer=layer, lr=lr, steps=steps)
    results, _ = _run_variants(variants, out, model, device, dtype, editor, dataset, offset, limit, overrides,
                               seed, threads, None, evaluation, eval_context, cases_at_once)
    ranked = [results[0], *sorted(results[1:], key=lambda r: -(r[1].get("avg") or 0.0))]
    _report(ranked, out, f"Sweep: {editor} on {dataset} cases from {offset} ({results[0][1]['n_cases']} cases), "
                         f"{model} (x100), best Avg. first")
