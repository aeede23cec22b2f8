"""``overtone bench``, ``demo`` and ``table``: benchmark runs and their summaries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from overtone.cli.app import app
from overtone.cli.common import (
    AbilityEveryOpt,
    AbilityOpt,
    AblationOptions,
    BatchOpt,
    DatasetOpt,
    EditorOpt,
    EditorOptions,
    EvalOptions,
    LimitOpt,
    ModelOptions,
    ObjectiveOpt,
    OffsetOpt,
    OverToneOptions,
    ParallelOpt,
    SeedOpt,
    SetOpt,
    StopLossOpt,
    StrictOpt,
    TruncateOpt,
    VerboseOpt,
    build,
    console,
    exit_on_interrupt,
    fail,
    grouped,
    hold_run_dir,
    overtone_config,
    parallel_option,
    precheck,
    run_bench,
    setup,
)

SequenceOpt = Annotated[int, typer.Option(
    "--sequence", min=1, help="continual editing: T edits in sequence per chunk, reverted between chunks (1: single)")]
EvalTimingOpt = Annotated[str, typer.Option(
    "--eval-timing", help="continual editing: evaluate a chunk's cases at its end, or each right after its edit "
    "(end, after-each)")]
SingleTokensOpt = Annotated[int | None, typer.Option(
    "--single-hop-tokens", min=1, help="MQuAKE: max new tokens of a single-hop answer (paper: 30)")]
MultiTokensOpt = Annotated[int | None, typer.Option(
    "--multi-hop-tokens", min=1, help="MQuAKE: max new tokens of a multi-hop answer (paper: 200)")]
MultiQuestionsOpt = Annotated[int | None, typer.Option(
    "--multi-hop-questions", min=1, help="MQuAKE: ask the first k of the 3 multi-hop paraphrases (default all)")]
TemperatureOpt = Annotated[float | None, typer.Option(
    "--temperature", min=0.0, help="MQuAKE: sampling temperature, seeded by --seed (paper: 0.1)")]


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
    single_hop_tokens: SingleTokensOpt = None,
    multi_hop_tokens: MultiTokensOpt = None,
    multi_hop_questions: MultiQuestionsOpt = None,
    temperature: TemperatureOpt = None,
    scoring: EvalOptions,
    ability: AbilityOpt = False,
    ability_every: AbilityEveryOpt = 0,
    strict: StrictOpt = False,
    truncate: TruncateOpt = False,
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
    (and --ability-every K after every K edits within it).
    With --parallel B, single editing edits B cases at once, each against the unedited model (the same
    results, faster; docs/parallel.md).

    The dataset slice and every case are checked before the model is loaded; one process at a time may
    write --out; Ctrl-C or SIGTERM keeps the finished cases, and the same command resumes.
    """
    from overtone.report import extra_tables, summary_table, to_rich
    from overtone.report.tables import protocol_title
    from overtone.runner import read_run

    setup(model.threads, seed, verbose)
    cases_at_once = parallel_option(parallel, editor, sequence, batch)
    if ability_every and ability_every >= sequence:
        fail(f"--ability-every {ability_every} measures within a chunk of --sequence {sequence} edits: give K below "
             f"T (the chunk's end is measured anyway with --ability)")
    cfg = overtone_config(editor, overtone, ablation)
    overrides = editing.settings(editor, settings, stop_loss=stop_loss)
    generation = {"single_hop_tokens": single_hop_tokens, "multi_hop_tokens": multi_hop_tokens,
                  "multi_hop_questions": multi_hop_questions, "temperature": temperature}
    with exit_on_interrupt(out):
        inputs = precheck(model.model, editor, overrides, dataset, offset, limit, cases_at_once, seed=seed,
                          sequence=sequence, eval_timing=eval_timing, generation=generation, batch=batch,
                          truncate=truncate, evaluation=scoring.evaluation, eval_context=scoring.eval_context)
        with hold_run_dir(out) as lock:
            lm, ed = build(model, editor, objective, cfg, overrides)
            summary = run_bench(lm, ed, dataset, offset, limit, out, seed, model.threads, f"{editor}/{objective}",
                                sequence, eval_timing, generation, batch, inputs=inputs, lock=lock, strict=strict,
                                ability=ability, ability_every=ability_every, parallel=cases_at_once)
    config, _, _ = read_run(out)
    rows = [(f"{editor} {objective}", summary)]
    console.print(summary_table(rows, title=f"{protocol_title(config)}, {model.model}"))
    for extra in extra_tables(rows):
        console.print(to_rich(extra))
    console.print(f"results in {out}")


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
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Edit the same cases with cross-entropy and with OverTone and print the two side by side.

    Cases are edited --parallel at a time (auto: as memory allows; the results of one at a time, faster),
    one at a time for an editor that cannot edit side by side."""
    from overtone.editors import EDITORS
    from overtone.report import markdown_table, summary_table

    setup(model.threads, seed, verbose)
    if parallel == "auto" and editor in EDITORS and EDITORS[editor].parallel_refusal:
        parallel = "1"
    cases_at_once = parallel_option(parallel, editor)
    cfg = overtone_config(editor, overtone)
    inputs = precheck(model.model, editor, {}, dataset, 0, limit, cases_at_once, seed=seed)
    rows = []
    lm = None
    for objective in ("ce", "overtone"):
        run = out / f"{editor}-{objective}"
        with exit_on_interrupt(run):
            lm, ed = build(model, editor, objective, cfg, {}, lm)
            summary = run_bench(lm, ed, dataset, 0, limit, run, seed, model.threads, f"{editor}/{objective}",
                                inputs=inputs, parallel=cases_at_once)
        rows.append((f"{editor} + {'CE' if objective == 'ce' else 'OverTone'}", summary))
    console.print(summary_table(rows, title=f"{dataset}, first {limit} cases, {model.model}, single editing (x100)",
                                caption=f"OverTone λ={cfg.lam} n={cfg.n_sigma} ε={cfg.epsilon}"))
    (out / "table.md").write_text(markdown_table(rows) + "\n")
    console.print(f"runs in {out}/, Markdown table in {out / 'table.md'}")


@app.command()
def table(
    runs: Annotated[list[Path], typer.Argument(help="run directories")],
    markdown: Annotated[bool, typer.Option("--markdown", help="print GitHub Markdown")] = False,
    paired: Annotated[bool, typer.Option(
        "--paired", help="also print each run's paired per-case differences to the first run of its table")] = False,
) -> None:
    """Print the summary tables of finished (or partial) runs: one per dataset and protocol."""
    from overtone.report import (
        dataset_tables,
        extra_tables,
        markdown_table,
        paired_markdown,
        paired_table,
        summary_table,
        to_markdown,
        to_rich,
    )
    from overtone.runner import StoreError, read_run, summarize

    loaded, records = [], {}
    for run in runs:
        try:
            config, cases, summary = read_run(run)
        except StoreError as exc:
            fail(str(exc))
        objective = config.get("objective") or {}
        label = f"{run.name} ({objective.get('name', '-')})"
        loaded.append((label, config, summary or summarize(cases)))
        records[label] = cases
    for title, rows in dataset_tables(loaded):
        if markdown:
            console.print(f"{title}\n\n{markdown_table(rows)}\n", markup=False, soft_wrap=True)
        else:
            console.print(summary_table(rows, title=title))
        for extra in extra_tables(rows):
            if markdown:
                console.print(f"{to_markdown(extra)}\n", markup=False, soft_wrap=True)
            else:
                console.print(to_rich(extra))
        if paired and len(rows) > 1:
            results = [(label, summary, records[label]) for label, summary in rows]
            if markdown:
                console.print(f"Paired differences to {rows[0][0]} (x100):\n\n{paired_markdown(results)}\n",
                              markup=False, soft_wrap=True)
            else:
                console.print(paired_table(results, title=f"paired differences to {rows[0][0]}"))
