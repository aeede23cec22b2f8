"""The ``overtone`` command line: a thin layer over the Python API.

    overtone bench --editor ft-m --objective overtone --dataset zsre --limit 50 --out runs/ftm-ot
    overtone demo  --limit 40                       # CE vs OverTone side by side
    overtone table runs/ftm-ce runs/ftm-ot          # tables from run directories
    overtone edit  --prompt "The Eiffel Tower is in" --target "Rome" --locality "The capital of Japan is"
"""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from overtone import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Knowledge editing with the OverTone objective.")
console = Console()
if not console.is_terminal:
    console.width = 120  # logs and pipes: wide enough that tables never truncate a number
log = logging.getLogger("overtone")

# Options shared by several commands, declared once.
ModelOpt = Annotated[str, typer.Option("--model", help="embedded name (smollm2-135m), local folder or hub id")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda, cuda:N")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="fp32 or bf16")]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=1, help="torch CPU threads (1 is fastest on busy cores)")]
EditorOpt = Annotated[str, typer.Option("--editor", help="editor name (ft-m)")]
ObjectiveOpt = Annotated[str, typer.Option("--objective", help="ce or overtone")]
LambdaOpt = Annotated[float | None, typer.Option("--lambda", help="OverTone: weight of the one-hot label")]
NSigmaOpt = Annotated[float | None, typer.Option("--n-sigma", help="OverTone: top-n-sigma filter width")]
EpsilonOpt = Annotated[float | None, typer.Option("--epsilon", help="OverTone: per-token KL floor (nats)")]
NoClipOpt = Annotated[bool, typer.Option("--no-clip", help="ablation 'w/o clip': no KL floor")]
StaticOpt = Annotated[bool, typer.Option("--static-target", help="ablation 'w/o dyn': prior from the unedited model")]
NoCheckOpt = Annotated[bool, typer.Option("--no-mode-check", help="ablation 'w/o chk': always use the mixture")]
NoFilterOpt = Annotated[bool, typer.Option("--no-filter", help="ablation 'w/o flt': no top-n-sigma filter")]
LayerOpt = Annotated[int | None, typer.Option("--layer", help="edited layer (editor default when omitted)")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="learning rate (editor default when omitted)")]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="max optimisation steps (editor default)")]
StopLossOpt = Annotated[float | None, typer.Option("--stop-loss", help="early-stop loss threshold (editor default)")]
DatasetOpt = Annotated[str, typer.Option("--dataset", help="benchmark name (zsre)")]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=0, help="number of cases (all when omitted)")]
OffsetOpt = Annotated[int, typer.Option("--offset", min=0, help="index of the first case")]
SeedOpt = Annotated[int, typer.Option("--seed", help="random seed")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")]


def _setup(threads: int, seed: int, verbose: bool) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)


def _fail(message: str) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def _overtone_config(lam: float | None, n_sigma: float | None, epsilon: float | None, no_clip: bool,
                     static_target: bool, no_mode_check: bool, no_filter: bool) -> Any:
    from overtone.objectives import OverToneConfig

    given = {"lam": lam, "n_sigma": n_sigma, "epsilon": epsilon}
    try:
        return OverToneConfig(
            **{k: v for k, v in given.items() if v is not None},
            clip=not no_clip, dynamic=not static_target, mode_check=not no_mode_check, filter=not no_filter,
        )
    except ValueError as exc:
        _fail(str(exc))


def _build(model: str, device: str, dtype: str, editor: str, objective: str, overtone_cfg: Any,
           editor_settings: dict[str, Any], lm: Any = None) -> tuple[Any, Any]:
    """Load the model (unless given) and build the editor; user errors become clean exits."""
    from overtone.editors import make_editor
    from overtone.models import ArchitectureError, ModelLoadError, load_model
    from overtone.objectives import make_objective

    try:
        lm = lm or load_model(model, device=device, dtype=dtype)
        return lm, make_editor(editor, lm, make_objective(objective, overtone_cfg), **editor_settings)
    except (ModelLoadError, ArchitectureError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )


def _run_bench(lm: Any, editor: Any, dataset: str, offset: int, limit: int | None, out: Path,
               seed: int, threads: int, label: str) -> dict[str, Any]:
    from overtone.benchmarks import DatasetError, load_benchmark
    from overtone.evaluation import Evaluator
    from overtone.runner import ResultStore, RunError, StoreError, run_single_editing

    try:
        cases = load_benchmark(dataset, limit=limit, offset=offset)
        config = {
            "overtone_version": __version__,
            "protocol": "single",
            "model": lm.identity,
            "editor": editor.describe(),
            "objective": editor.objective.config() if editor.objective else None,
            "dataset": {"name": dataset, "offset": offset},
            "limit": limit,
            "seed": seed,
            "threads": threads,
        }
        store = ResultStore(out, config)
    except (DatasetError, StoreError) as exc:
        _fail(str(exc))
    if store.done:
        log.info("%s: resuming, %d cases already done", out, len(store.done & {c.case_id for c in cases}))
    with _progress() as progress:
        task = progress.add_task(label, total=len(cases), status="")

        def on_case(record: dict[str, Any] | None) -> None:
            status = "" if record is None else (
                f"rel {100 * record['post']['rel']:.0f} steps {record['steps']} "
                f"{record['edit_s'] + record['eval_s']:.1f}s")
            progress.update(task, advance=1, status=status)

        try:
            return run_single_editing(editor, Evaluator(lm), cases, store, on_case)
        except RunError as exc:
            _fail(str(exc))


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
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Single editing over a benchmark: edit each case from the unedited model, evaluate, revert."""
    from overtone.report import summary_table

    _setup(threads, seed, verbose)
    cfg = _overtone_config(lam, n_sigma, epsilon, no_clip, static_target, no_mode_check, no_filter)
    settings = {"layer": layer, "lr": lr, "steps": steps, "stop_loss": stop_loss}
    lm, ed = _build(model, device, dtype, editor, objective, cfg, settings)
    summary = _run_bench(lm, ed, dataset, offset, limit, out, seed, threads, f"{editor}/{objective}")
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

    _setup(threads, seed, verbose)
    cfg = _overtone_config(lam, n_sigma, epsilon, False, False, False, False)
    rows = []
    lm = None
    for objective in ("ce", "overtone"):
        lm, ed = _build(model, device, dtype, editor, objective, cfg, {}, lm)
        summary = _run_bench(lm, ed, dataset, 0, limit, out / f"{editor}-{objective}", seed, threads,
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
            _fail(str(exc))
        objective = config.get("objective") or {}
        rows.append((f"{run.name} ({objective.get('name', '-')})", summary or summarize(cases)))
    if markdown:
        console.print(markdown_table(rows), markup=False)
    else:
        console.print(summary_table(rows))


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
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="greedy tokens to show")] = 12,
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Edit one fact and print greedy completions before and after the edit."""
    from overtone.benchmarks import EditCase
    from overtone.generation import greedy_complete

    _setup(threads, seed, verbose)
    cfg = _overtone_config(lam, n_sigma, epsilon, False, False, False, False)
    lm, ed = _build(model, device, dtype, editor, objective, cfg, {"layer": layer, "lr": lr, "steps": steps})
    try:
        case = EditCase(case_id="cli", prompt=prompt, target=target)
    except ValueError as exc:
        _fail(str(exc))
    prompts = [("edit", prompt)] + [("paraphrase", p) for p in paraphrase or []] + [
        ("locality", p) for p in locality or []]
    before = greedy_complete(lm, [p for _, p in prompts], max_new_tokens)
    handle = ed.edit([case])
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

    _setup(1, 0, verbose)
    if model not in embedded.EMBEDDED:
        _fail(f"{model!r} is not an embedded model; embedded: {', '.join(embedded.EMBEDDED)}")
    try:
        folder, sha = embedded.checkpoint_dir(model)
    except FileNotFoundError as exc:
        _fail(str(exc))
    console.print(f"{model}: {embedded.EMBEDDED[model].description}\n  cache {folder}\n  gguf sha256 {sha}")


@app.callback()
def main() -> None:
    """overtone: knowledge editing of language models with the OverTone objective."""


if __name__ == "__main__":
    sys.exit(app())
