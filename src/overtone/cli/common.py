"""Options and helpers shared by the commands: declared once, used everywhere."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from overtone import __version__

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
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="editor setting KEY=VALUE (repeatable), e.g. layers=3,4,5 or mom2_adjustment=false"),
]
DatasetOpt = Annotated[str, typer.Option("--dataset", help="benchmark name (zsre)")]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=0, help="number of cases (all when omitted)")]
OffsetOpt = Annotated[int, typer.Option("--offset", min=0, help="index of the first case")]
SeedOpt = Annotated[int, typer.Option("--seed", help="random seed")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")]


def setup(threads: int, seed: int, verbose: bool) -> None:
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


def fail(message: str) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def overtone_config(lam: float | None, n_sigma: float | None, epsilon: float | None, no_clip: bool,
                     static_target: bool, no_mode_check: bool, no_filter: bool) -> Any:
    from overtone.objectives import OverToneConfig

    given = {"lam": lam, "n_sigma": n_sigma, "epsilon": epsilon}
    try:
        return OverToneConfig(
            **{k: v for k, v in given.items() if v is not None},
            clip=not no_clip, dynamic=not static_target, mode_check=not no_mode_check, filter=not no_filter,
        )
    except ValueError as exc:
        fail(str(exc))


def editor_settings(named: dict[str, Any], assignments: list[str] | None) -> dict[str, Any]:
    """The editor settings of dedicated options (``--layer`` ...) and of ``--set KEY=VALUE`` pairs.

    Values are read as YAML ("false", "0.5", "[3, 4]"); a bare comma list ("3,4,5") is a list.
    """
    import yaml

    settings = dict(named)
    for item in assignments or []:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            fail(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(text)
            if isinstance(value, str) and "," in value:
                value = [yaml.safe_load(part) for part in value.split(",")]
        except yaml.YAMLError as exc:
            fail(f"--set {item!r}: cannot read the value: {exc}")
        if settings.get(key) is not None:
            fail(f"--set {key} repeats a setting already given")
        settings[key] = value
    return settings


def build(model: str, device: str, dtype: str, editor: str, objective: str, overtone_cfg: Any,
           editor_settings: dict[str, Any], lm: Any = None) -> tuple[Any, Any]:
    """Load the model (unless given) and build the editor; user errors become clean exits."""
    from overtone.editors import make_editor
    from overtone.models import ArchitectureError, ModelLoadError, load_model
    from overtone.objectives import make_objective

    try:
        lm = lm or load_model(model, device=device, dtype=dtype)
        return lm, make_editor(editor, lm, make_objective(objective, overtone_cfg), **editor_settings)
    except (ModelLoadError, ArchitectureError, ValueError, TypeError, FileNotFoundError) as exc:
        fail(str(exc))


def progress_bar() -> Progress:
    """A progress bar with a free-text status field."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )


def run_bench(lm: Any, editor: Any, dataset: str, offset: int, limit: int | None, out: Path,
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
        fail(str(exc))
    if store.done:
        log.info("%s: resuming, %d cases already done", out, len(store.done & {c.case_id for c in cases}))
    with progress_bar() as progress:
        task = progress.add_task(label, total=len(cases), status="")

        def on_case(record: dict[str, Any] | None) -> None:
            status = "" if record is None else (
                f"rel {100 * record['post']['rel']:.0f} steps {record['steps']} "
                f"{record['edit_s'] + record['eval_s']:.1f}s")
            progress.update(task, advance=1, status=status)

        try:
            return run_single_editing(editor, Evaluator(lm), cases, store, on_case)
        except RunError as exc:
            fail(str(exc))


