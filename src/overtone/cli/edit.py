"""``overtone edit`` (one ad-hoc fact) and ``overtone prepare`` (build the embedded model's cache)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from overtone.cli.app import app
from overtone.cli.common import (
    DeviceOpt,
    DtypeOpt,
    EditorOpt,
    EpsilonOpt,
    LambdaOpt,
    LayerOpt,
    LrOpt,
    ModelOpt,
    NSigmaOpt,
    ObjectiveOpt,
    SeedOpt,
    SetOpt,
    StepsOpt,
    ThreadsOpt,
    VerboseOpt,
    build,
    console,
    editor_settings,
    fail,
    overtone_config,
    precheck_cases,
    setup,
)


@app.command()
def edit(
    prompt: Annotated[str, typer.Option("--prompt", help="the prompt whose answer is edited")],
    target: Annotated[str, typer.Option("--target", help="the new answer")],
    paraphrase: Annotated[list[str] | None, typer.Option("--paraphrase", help="paraphrases (repeatable)")] = None,
    locality: Annotated[list[str] | None, typer.Option("--locality", help="unrelated prompts (repeatable)")] = None,
    editor: EditorOpt = "ft-m",
    objective: ObjectiveOpt = "overtone",
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
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="greedy tokens to show")] = 12,
    subject: Annotated[str | None, typer.Option("--subject", help="the subject (ROME/MEMIT: its last token)")] = None,
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Edit one fact and print greedy completions before and after the edit."""
    from overtone.benchmarks import EditCase
    from overtone.editors import EditError
    from overtone.generation import greedy_complete

    setup(threads, seed, verbose)
    cfg = overtone_config(editor, lam, n_sigma, epsilon)
    overrides = editor_settings(editor, settings, layer=layer, lr=lr, steps=steps)
    try:
        case = EditCase(case_id="cli", prompt=prompt, target=target, subject=subject)
    except ValueError as exc:
        fail(str(exc))
    precheck_cases(model, editor, overrides, [case])  # before the model (and ROME/MEMIT's statistics)
    lm, ed = build(model, device, dtype, editor, objective, cfg, overrides)
    prompts = [("edit", prompt)] + [("paraphrase", p) for p in paraphrase or []] + [
        ("locality", p) for p in locality or []]
    before = greedy_complete(lm, [p for _, p in prompts], max_new_tokens)
    try:
        handle = ed.edit([case])
    except (EditError, ValueError) as exc:
        fail(str(exc))
    after = greedy_complete(lm, [p for _, p in prompts], max_new_tokens)
    stats = handle.stats
    out = Table(title=f"{editor} + {objective}: {prompt!r} -> {target!r} "
                      f"({stats.steps} steps, {stats.time_s:.1f} s, final loss {stats.losses[-1]:.4f})")
    for column in ("probe", "prompt", "before", "after"):
        out.add_column(column)
    for (kind, text), b, a in zip(prompts, before, after, strict=True):
        out.add_row(kind, text, repr(b), repr(a))
    console.print(out)


@app.command()
def prepare(
    model: ModelOpt = "smollm2-135m",
    verbose: VerboseOpt = False,
) -> None:
    """Build the embedded model's safetensors cache now (otherwise the first load does it)."""
    from overtone.models import embedded

    setup(1, 0, verbose)
    if model not in embedded.EMBEDDED:
        fail(f"{model!r} is not an embedded model; embedded: {', '.join(embedded.EMBEDDED)}")
    try:
        folder, sha = embedded.checkpoint_dir(model)
    except FileNotFoundError as exc:
        fail(str(exc))
    console.print(f"{model}: {embedded.EMBEDDED[model].description}\n  cache {folder}\n  gguf sha256 {sha}")


