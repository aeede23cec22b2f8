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
    LambdaOpt,
    LayerOpt,
    LimitOpt,
    LrOpt,
    ModelOpt,
    NSigmaOpt,
    OffsetOpt,
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


def _run_variants(variants: list[Any], out: Path, model: str, device: str, dtype: str, editor: str,
                  dataset: str, offset: int, limit: int | None, settings: dict[str, Any], seed: int,
                  threads: int) -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    from overtone.runner import read_run

    inputs = precheck(model, editor, settings, dataset, offset, limit, seed=seed)  # before the model is loaded
    results = []
    lm = None
    for v in variants:
        lm, ed = build(model, device, dtype, editor, v.objective, v.overtone, {**settings, **v.editor_settings}, lm)
        summary = run_bench(lm, ed, dataset, offset, limit, out / v.slug, seed, threads, f"{editor} {v.label}",
                            inputs=inputs)
        results.append((v.label, summary, read_run(out / v.slug)[1]))
    return results


def _report(results: list[tuple[str, dict[str, Any], list[dict[str, Any]]]], out: Path, title: str) -> None:
    from overtone.report import markdown_table, paired_markdown, paired_table, summary_table

    rows = [(label, summary) for label, summary, _ in results]
    console.print(summary_table(rows, title=title))
    console.print(paired_table(results, base=0, title="paired differences to CE (x100)"))
    (out / "table.md").write_text(f"{title}\n\n{markdown_table(rows)}\n\nPaired differences to CE (x100):\n\n"
                                  f"{paired_markdown(results)}\n")
    console.print(f"runs in {out}/, tables in {out / 'table.md'}")


@app.command()
def ablate(
    out: Annotated[Path, typer.Option("--out", help="parent directory of the variant runs (resumable)")],
    editor: EditorOpt = "lora",
    dataset: DatasetOpt = "zsre",
    limit: LimitOpt = 50,
    offset: OffsetOpt = 0,
    stop_grid: Annotated[str, typer.Option("--stop-grid", help="CE early-stop thresholds of the control rows")]
    = "0.01,0.03,0.1",
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
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
) -> None:
    """The paper's ablation (Table 4.4) plus CE with looser early stops, with paired statistics."""
    from overtone.editors import EDITORS
    from overtone.runner.variants import ablation_variants

    setup(threads, seed, verbose)
    if editor not in EDITORS:
        fail(f"unknown editor {editor!r}; available: {', '.join(sorted(EDITORS))}")
    # a control equal to the editor's own stop rule would repeat the CE row
    default_stop = getattr(EDITORS[editor].config_class(), "stop_loss", None)
    grid = [t for t in _floats(stop_grid, "--stop-grid") if t != default_stop]
    variants = ablation_variants(overtone_config(editor, lam, n_sigma, epsilon), grid)
    overrides = editor_settings(editor, settings, layer=layer, lr=lr, steps=steps)
    results = _run_variants(variants, out, model, device, dtype, editor, dataset, offset, limit, overrides, seed,
                            threads)
    first = results[0][1]
    _report(results, out, f"Ablation: {editor} on {dataset} cases {offset}..{offset + first['n_cases'] - 1}, "
                          f"{model}, single editing (x100)")


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
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Tune OverTone's lambda, n and epsilon for one editor on a development slice, against CE."""
    from overtone.runner.variants import sweep_variants

    setup(threads, seed, verbose)
    if dataset == "zsre" and offset < DEV_OFFSET:
        log.warning("cases %d.. overlap the reported ZsRE slice (0..%d): tuned numbers there are not reportable",
                    offset, DEV_OFFSET - 1)
    variants = sweep_variants(overtone_config(editor), _floats(lambdas, "--lambdas"),
                              _floats(n_sigmas, "--n-sigmas"), _floats(epsilons, "--epsilons"))
    overrides = editor_settings(editor, settings, layer=layer, lr=lr, steps=steps)
    results = _run_variants(variants, out, model, device, dtype, editor, dataset, offset, limit, overrides, seed,
                            threads)
    ranked = [results[0], *sorted(results[1:], key=lambda r: -(r[1].get("avg") or 0.0))]
    _report(ranked, out, f"Sweep: {editor} on {dataset} cases from {offset} ({results[0][1]['n_cases']} cases), "
                         f"{model} (x100), best Avg. first")
