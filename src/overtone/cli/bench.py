"""``overtone bench``, ``demo`` and ``table``: benchmark runs and their summaries."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from overtone.cli.app import app
from overtone.cli.common import (
    check_out,
    check_spec,
    console,
    execute,
    exit_on_interrupt,
    fail,
    hold_run_dir,
    prepare_spec,
    setup,
    specified,
)
from overtone.cli.options import (
    AbilityEveryOpt,
    AbilityOpt,
    AblationOptions,
    BatchOpt,
    DatasetOpt,
    EditorOpt,
    EditorOptions,
    EvalCacheOpt,
    EvalOptions,
    EvalTimingOpt,
    GenerationOptions,
    LimitOpt,
    ModelOptions,
    ObjectiveOpt,
    OffsetOpt,
    OverToneOptions,
    ParallelOpt,
    ProbeOptions,
    SeedOpt,
    SequenceOpt,
    SetOpt,
    StopLossOpt,
    StreamOptions,
    StrictOpt,
    TruncateOpt,
    VerboseOpt,
    grouped,
)


@app.command()
@grouped
def bench(
    *,
    out: Annotated[Path, typer.Option("--out", help="run directory (resumed if it exists)")],
    editor: EditorOpt = "ft-m",
    objective: ObjectiveOpt = "overtone",
    dataset: DatasetOpt = "zsre",
    limit: LimitOpt = None,
    offset: OffsetOpt = 0,
    model: ModelOptions,
    overtone: OverToneOptions,
    ablation: AblationOptions,
    editing: EditorOptions,
    stop_loss: StopLossOpt = None,
    settings: SetOpt = None,
    sequence: SequenceOpt = 1,
    eval_timing: EvalTimingOpt = "end",
    batch: BatchOpt = 1,
    parallel: ParallelOpt = "1",
    generation: GenerationOptions,
    scoring: EvalOptions,
    ability: AbilityOpt = False,
    ability_every: AbilityEveryOpt = 0,
    streaming: StreamOptions,
    strict: StrictOpt = False,
    truncate: TruncateOpt = False,
    probing: ProbeOptions,
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Edit a benchmark's cases and score them: single editing, or continual editing with --sequence T.

    Single editing edits each case from the unedited model, evaluates it and reverts. With --sequence T,
    chunks of T cases are edited one after the other without reverting, all T are evaluated on the final
    model (or each after its edit, --eval-timing after-each), then the chunk is reverted; metrics are
    averaged over chunks. With --batch B, each chunk's edits are made B cases per edit call (batch
    editing: --sequence 100 --batch 100 edits 100 facts in one MEMIT update). --eval wild or both scores
    generated answers too (docs/wild.md); --ability tracks perplexity and general facts after each chunk
    (and --ability-every K after every K edits within it). --stream makes each chunk a lifelong edit stream
    (--sequence 10000 --batch 100): checkpointed every --checkpoint-every batches, so a killed run resumes from
    its last checkpoint, with a curve every --curve-every edits and the lifelong metrics (docs/lifelong-streams.md).
    With --parallel B, single editing edits B cases at once, each against the unedited model (the same
    results, faster; docs/parallel.md).

    The options, the dataset slice and every case are checked before the model is loaded (a case holds at
    most --max-probes probes of each kind); one process at a time may write --out; Ctrl-C or SIGTERM keeps
    the finished cases, and the same command resumes.
    """
    check_out(out)  # a held or damaged --out is refused before anything heavy is imported
    from overtone.report import extra_tables, summary_table, to_rich
    from overtone.report.tables import protocol_title, stream_of
    from overtone.runner import read_run
    from overtone.runner.spec import RunSpec, overtone_for

    setup(model.threads, verbose)
    spec = specified(lambda: RunSpec(
        editor=editor, objective=objective, dataset=dataset, offset=offset, limit=limit, model=model.model,
        device=model.device, dtype=model.dtype, threads=model.threads,
        overtone=overtone_for(editor, ablation.switches(), **overtone.given()),
        settings=tuple(editing.settings(editor, settings, stop_loss=stop_loss).items()), sequence=sequence,
        batch=batch, eval_timing=eval_timing, evaluation=scoring.evaluation, eval_context=scoring.eval_context,
        eval_cache=scoring.eval_cache,
        generation=tuple(asdict(generation).items()), ability=ability, ability_every=ability_every,
        parallel=parallel, seed=seed, strict=strict, truncate=truncate, max_probes=probing.max_probes,
        probes=probing.probes, **asdict(streaming)))
    with exit_on_interrupt(out):
        inputs = check_spec(spec)
        with hold_run_dir(out) as lock:
            summary = execute(prepare_spec(spec, inputs), out, f"{editor}/{objective}", lock)
    config, records, _ = read_run(out)
    rows = [(f"{editor} {objective}", summary)]
    console.print(summary_table(rows, title=f"{protocol_title(config)}, {model.model}"))
    for extra in extra_tables(rows, stream_of(rows[0][0], config, records)):
        console.print(to_rich(extra))
    console.print(f"results in {out}", markup=False)


@app.command()
@grouped
def demo(
    *,
    limit: LimitOpt = 40,
    out: Annotated[Path, typer.Option("--out", help="parent directory of the two runs")] = Path("runs/demo"),
    editor: EditorOpt = "ft-m",
    dataset: DatasetOpt = "zsre",
    model: ModelOptions,
    overtone: OverToneOptions,
    parallel: ParallelOpt = "auto",
    eval_cache: EvalCacheOpt = True,
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Edit the same cases with cross-entropy and with OverTone and print the two side by side.

    Cases are edited --parallel at a time (auto: as memory allows; the results of one at a time, faster),
    one at a time for an editor that cannot edit side by side."""
    for objective in ("ce", "overtone"):  # held or damaged runs are refused before anything heavy is imported
        check_out(out / f"{editor}-{objective}")
    from overtone.editors import EDITORS
    from overtone.report import markdown_table, summary_table
    from overtone.runner.spec import RunSpec, overtone_for

    setup(model.threads, verbose)
    if parallel == "auto" and editor in EDITORS and EDITORS[editor].parallel_refusal:
        parallel = "1"
    cfg = specified(lambda: overtone_for(editor, **overtone.given()))
    specs = [specified(lambda objective=objective: RunSpec(
        editor=editor, objective=objective, dataset=dataset, limit=limit, model=model.model, device=model.device,
        dtype=model.dtype, threads=model.threads, overtone=cfg, parallel=parallel, seed=seed, eval_cache=eval_cache))
        for objective in ("ce", "overtone")]
    inputs = check_spec(specs[0])
    rows = []
    lm = None
    for spec in specs:
        run = out / f"{editor}-{spec.objective}"
        with exit_on_interrupt(run):
            prepared = prepare_spec(spec, inputs, lm)
            lm = prepared.lm
            summary = execute(prepared, run, f"{editor}/{spec.objective}")
        rows.append((f"{editor} + {'CE' if spec.objective == 'ce' else 'OverTone'}", summary))
    console.print(summary_table(rows, title=f"{dataset}, first {limit} cases, {model.model}, single editing (x100)",
                                caption=f"OverTone λ={cfg.lam} n={cfg.n_sigma} ε={cfg.epsilon}"))
    (out / "table.md").write_text(markdown_table(rows) + "\n")
    console.print(f"runs in {out}/, Markdown table in {out / 'table.md'}", markup=False)


@app.command()
def table(
    runs: Annotated[list[Path], typer.Argument(help="run directories")],
    markdown: Annotated[bool, typer.Option("--markdown", help="print GitHub Markdown")] = False,
    paired: Annotated[bool, typer.Option(
        "--paired", help="also print each run's paired per-case differences to the first run of its table")] = False,
    by_case: Annotated[bool, typer.Option(
        "--by-case", help="--paired: an interval over cases even where they share an edited model (a stream, whose "
                          "runs are one chunk each; optimistic, and said so)")] = False,
) -> None:
    """Print the summary tables of finished (or partial) runs: one per dataset and protocol."""
    from rich.markup import escape

    from overtone.report import (
        dataset_tables,
        extra_tables,
        markdown_table,
        markdown_text,
        paired_markdown,
        paired_table,
        summary_table,
        to_markdown,
        to_rich,
    )
    from overtone.report.runs import checked_summary, mixed_code
    from overtone.report.tables import stream_of
    from overtone.runner import StoreError, read_run

    loaded, records, streams, configs = [], {}, {}, []
    for run in runs:
        try:
            config, cases, saved = read_run(run)
        except StoreError as exc:
            fail(str(exc))
        summary, stale = checked_summary(run, cases, saved)
        if stale:
            console.print(f"[bold yellow]warning:[/] {escape(stale)}", soft_wrap=True)
        objective = config.get("objective") or {}
        label = f"{run.name} ({objective.get('name', '-')})"
        loaded.append((label, config, summary))
        records[label] = cases
        streams[label] = stream_of(label, config, cases)
        configs.append((str(run), config))
    warning = mixed_code(configs)
    if warning:
        console.print(f"warning: {warning}", style="bold yellow", markup=False, soft_wrap=True)
    for title, rows in dataset_tables(loaded):
        if markdown:
            console.print(f"{markdown_text(title)}\n\n{markdown_table(rows)}\n", markup=False, soft_wrap=True)
        else:
            console.print(summary_table(rows, title=title))
        for extra in extra_tables(rows, [s for label, _ in rows for s in streams[label]]):
            if markdown:
                console.print(f"{to_markdown(extra)}\n", markup=False, soft_wrap=True)
            else:
                console.print(to_rich(extra))
        if paired and len(rows) > 1:
            results = [(label, summary, records[label]) for label, summary in rows]
            if markdown:
                console.print(f"Paired differences to {markdown_text(rows[0][0])} (x100):\n\n"
                              f"{paired_markdown(results, by_case=by_case)}\n",
                              markup=False, soft_wrap=True)
            else:
                console.print(paired_table(results, title=f"paired differences to {rows[0][0]}", by_case=by_case))
