"""``overtone edit`` (one fact, or a file of facts, optionally saved) and ``overtone prepare`` (build the
embedded model's cache)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import typer

from overtone.cli.app import app
from overtone.cli.common import check_spec, console, exit_on_interrupt, fail, prepare_spec, setup, specified
from overtone.cli.options import (
    BatchOpt,
    EditorOpt,
    EditorOptions,
    EvalCacheOpt,
    FactsOpt,
    LimitOpt,
    MaxNewTokensOpt,
    ModelOpt,
    ModelOptions,
    ObjectiveOpt,
    OffsetOpt,
    OverToneOptions,
    ProbeOptions,
    SaveOpt,
    SeedOpt,
    SetOpt,
    ShowOpt,
    VerboseOpt,
    grouped,
)


def probe_prompts(cases: Sequence[Any]) -> list[tuple[str, str, str]]:
    """(case id, probe kind, prompt) of every prompt of ``cases`` whose completion is shown."""
    rows = []
    for case in cases:
        rows += [(case.case_id, "edit", request.prompt) for request in case.requests]
        rows += [(case.case_id, "paraphrase", text) for text in case.rephrases]
        for kind, name in (("portability", "portability"), ("locality", "locality")):
            rows += [(case.case_id, name, p.prompt) for probes in getattr(case, kind).values() for p in probes]
    return rows


def print_completions(title: str, rows: list[tuple[str, str, str]], before: list[str], after: list[str]) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title, style="table.title"))
    for column in ("case", "probe", "prompt", "before", "after"):
        table.add_column(column)
    for (case_id, kind, text), b, a in zip(rows, before, after, strict=True):
        table.add_row(*(Text(cell) for cell in (case_id, kind, text, repr(b), repr(a))))
    console.print(table)


def _cell(record: dict[str, Any], metric: str) -> str:
    post, pre = record["post"].get(metric), record["pre"].get(metric)
    if post is None:
        return "–"
    return f"{100 * post:.1f}" if pre is None else f"{100 * pre:.1f} → {100 * post:.1f}"


def print_metrics(title: str, cases: Sequence[Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The teacher-forced metrics of each case (x100, before → after) and their summary, which is returned."""
    from rich.table import Table
    from rich.text import Text

    from overtone.evaluation import METRICS
    from overtone.runner import summarize

    table = Table(title=Text(title, style="table.title"))
    edited = any(r.get("steps") is not None for r in records)  # made by this run, not applied from a file
    for column in ("case", "target", "Rel.", "Gen.", "Por.", "Loc.", *(("steps",) if edited else ())):
        table.add_column(column, justify="left" if column in ("case", "target") else "right")
    for case, record in zip(cases, records, strict=True):
        steps = (f"{record['steps']:g}",) if edited else ()
        table.add_row(Text(case.case_id), Text(case.target), *(_cell(record, m) for m in METRICS), *steps)
    console.print(table)
    summary = summarize(records, METRICS)
    parts = []
    for metric, label in zip(METRICS, ("Rel.", "Gen.", "Por.", "Loc."), strict=True):
        post, pre = summary[metric], summary["pre"].get(metric)
        parts.append(f"{label} –" if post is None else
                     f"{label} {post:.1f}" if pre is None else f"{label} {pre:.1f} → {post:.1f}")
    console.print(f"{len(records)} fact{'' if len(records) == 1 else 's'}: " + ", ".join(parts))
    return summary


def _read_cases(facts: Any, prompt: str | None, target: str | None, subject: str | None,
                paraphrase: list[str] | None, locality: list[str] | None, limit: int | None, offset: int) -> list[Any]:
    """The cases to edit, from --facts or from --prompt/--target; every problem is a clean exit."""
    from overtone.benchmarks import DatasetError, EditCase, Probe, load_benchmark
    from overtone.benchmarks.facts import LOCALITY_KIND

    single = (prompt, target, subject, paraphrase, locality)
    if facts is not None:
        if any(v is not None for v in single):
            fail("--facts reads every fact from the file; --prompt, --target, --subject, --paraphrase and --locality "
                 "describe one fact instead")
        try:
            cases = load_benchmark(str(facts), limit=limit, offset=offset)
        except DatasetError as exc:
            fail(str(exc))
        return cases
    if prompt is None or target is None:
        fail("give --facts FILE, or --prompt and --target for one fact")
    if limit is not None or offset:
        fail("--limit and --offset select facts of a --facts file")
    try:
        probes = tuple(Probe(p, "") for p in locality or [])  # "": scored on the unedited model's continuation
        return [EditCase(case_id="cli", prompt=prompt, target=target, subject=subject,
                         rephrases=tuple(paraphrase or []), locality={LOCALITY_KIND: probes} if probes else {})]
    except ValueError as exc:
        fail(str(exc))


@app.command()
@grouped
def edit(
    *,
    prompt: Annotated[str | None, typer.Option("--prompt", help="one fact: the prompt whose answer is edited")] = None,
    target: Annotated[str | None, typer.Option("--target", help="one fact: the new answer")] = None,
    paraphrase: Annotated[list[str] | None, typer.Option("--paraphrase", help="paraphrases (repeatable)")] = None,
    locality: Annotated[list[str] | None, typer.Option("--locality", help="unrelated prompts (repeatable)")] = None,
    subject: Annotated[str | None, typer.Option("--subject", help="the subject (ROME/MEMIT: its last token)")] = None,
    facts: FactsOpt = None,
    limit: LimitOpt = None,
    offset: OffsetOpt = 0,
    batch: BatchOpt = 1,
    save: SaveOpt = None,
    editor: EditorOpt = "ft-m",
    objective: ObjectiveOpt = "overtone",
    model: ModelOptions,
    overtone: OverToneOptions,
    editing: EditorOptions,
    settings: SetOpt = None,
    probing: ProbeOptions,
    max_new_tokens: MaxNewTokensOpt = 12,
    show: ShowOpt = 20,
    eval_cache: EvalCacheOpt = True,
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Edit facts in sequence (--batch B: B per edit call, for MEMIT), print greedy completions and
    teacher-forced metrics before and after, and save the edit with --save DIR.

    Ctrl-C or SIGTERM ends it with one line; nothing is saved until the end, so the same command starts again."""
    from overtone.artifacts import ArtifactError, folder_bytes, save_edit
    from overtone.artifacts.artifact import new_folder
    from overtone.editors import EditStack
    from overtone.generation import greedy_complete
    from overtone.runner import CaseError
    from overtone.runner.spec import RunSpec, overtone_for

    cases = _read_cases(facts, prompt, target, subject, paraphrase, locality, limit, offset)
    if save is not None:
        try:
            new_folder(save)
        except ArtifactError as exc:
            fail(str(exc))
    setup(model.threads, verbose)
    spec = specified(lambda: RunSpec(
        editor=editor, objective=objective, model=model.model, device=model.device, dtype=model.dtype,
        threads=model.threads, overtone=overtone_for(editor, **overtone.given()),
        settings=tuple(editing.settings(editor, settings).items()), cases=tuple(cases),
        sequence=max(len(cases), batch), batch=batch, seed=seed, max_probes=probing.max_probes,
        probes=probing.probes, eval_cache=eval_cache))
    with exit_on_interrupt():
        prepared = prepare_spec(spec, check_spec(spec))  # the cases checked before the model (and the statistics)
        lm, ed, cases = prepared.lm, prepared.editor, prepared.cases
        rows = probe_prompts(cases[:show])
        before = greedy_complete(lm, [text for *_, text in rows], max_new_tokens)
        stack = EditStack()
        try:
            records = prepared.edit_kept(stack)
        except CaseError as exc:
            fail(str(exc))
        after = greedy_complete(lm, [text for *_, text in rows], max_new_tokens)
        seconds = sum(r["edit_s"] for r in records)
        print_completions(f"{editor} + {objective}: {len(cases)} fact(s) edited in sequence"
                          f"{f', {batch} per edit' if batch > 1 else ''} ({seconds:.1f} s); greedy completions", rows,
                          before, after)
        summary = print_metrics("teacher-forced metrics (x100, before → after)", cases, records)
        if save is not None:
            metrics = {"summary": summary, "cases": [
                {k: r[k] for k in ("case_id", "pre", "post", "detail", "steps", "final_loss")} for r in records]}
            try:
                artifact = save_edit(ed, save, facts=cases, metrics=metrics,
                                     protocol={"order": "sequence", "batch": batch, "eval_timing": "end"})
            except ArtifactError as exc:
                fail(str(exc))
            console.print(f"saved the edit to {artifact.path} ({folder_bytes(artifact.path) / 1e6:.2f} MB)",
                          markup=False)


@app.command()
def prepare(
    model: ModelOpt = "smollm2-135m",
    verbose: VerboseOpt = False,
) -> None:
    """Build the embedded model's safetensors cache now (otherwise the first load does it)."""
    from overtone.models import embedded

    setup(1, verbose)
    if model not in embedded.EMBEDDED:
        fail(f"{model!r} is not an embedded model; embedded: {', '.join(embedded.EMBEDDED)}")
    try:
        folder, sha = embedded.checkpoint_dir(model)
    except FileNotFoundError as exc:
        fail(str(exc))
    console.print(f"{model}: {embedded.EMBEDDED[model].description}\n  cache {folder}\n  gguf sha256 {sha}",
                  markup=False)
