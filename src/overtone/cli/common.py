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

console = Console()
if not console.is_terminal:
    console.width = 120  # logs and pipes: wide enough that tables never truncate a number
log = logging.getLogger("overtone")

# Options shared by several commands, declared once.
ModelOpt = Annotated[str, typer.Option("--model", help="embedded name (smollm2-135m), local folder or hub id")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda, cuda:N")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="fp32 or bf16")]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=1, help="torch CPU threads (1 is fastest on busy cores)")]
EditorOpt = Annotated[str, typer.Option("--editor", help="editor name (ft-m, lora, wise, melo)")]
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
DatasetOpt = Annotated[str, typer.Option("--dataset", help="benchmark name or dataset file (overtone datasets)")]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=0, help="number of cases (all when omitted)")]
OffsetOpt = Annotated[int, typer.Option("--offset", min=0, help="index of the first case")]
SeedOpt = Annotated[int, typer.Option("--seed", help="random seed")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")]
ExecutorOpt = Annotated[str, typer.Option(
    "--executor", help="local (this process, one worker) or ray (one worker process per --workers; needs "
    "pip install 'overtone[ray]')")]
AddressOpt = Annotated[str | None, typer.Option(
    "--address", help="ray: a running cluster to use (e.g. auto, or HEAD_IP:6379); default: a private local "
    "instance on 127.0.0.1")]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", min=1, help="ray: worker processes, each with its own model (default: as many as CPUs/GPUs "
    "allow)")]
ShardOpt = Annotated[int, typer.Option(
    "--shard-size", min=1, help="cases per unit of work in single editing (a continual chunk is never split)")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="any editor setting, KEY=VALUE (repeatable), e.g. --set rank=4 --set layers=10,11"),
]


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


def overtone_config(editor: str, lam: float | None = None, n_sigma: float | None = None,
                    epsilon: float | None = None, no_clip: bool = False, static_target: bool = False,
                    no_mode_check: bool = False, no_filter: bool = False) -> Any:
    """OverTone settings: the editor's tuned defaults, overridden by what the user gave."""
    from dataclasses import replace

    from overtone.editors import EDITORS
    from overtone.objectives import OverToneConfig

    base = EDITORS[editor].overtone_defaults if editor in EDITORS else OverToneConfig()
    given = {"lam": lam, "n_sigma": n_sigma, "epsilon": epsilon}
    try:
        return replace(
            base, **{k: v for k, v in given.items() if v is not None},
            clip=not no_clip, dynamic=not static_target, mode_check=not no_mode_check, filter=not no_filter,
        )
    except ValueError as exc:
        fail(str(exc))


def _parse_value(text: str, kind: Any) -> Any:
    import types
    import typing

    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if text.lower() == "none" and type(None) in args:
            return None
        return _parse_value(text, next(a for a in args if a is not type(None)))
    if origin is tuple:
        # "3,4,5" for tuple[int, ...]; pairs for tuple[tuple[int, int], ...] are separated by ";": "5,10;10,10"
        parts = [part for part in text.split(";" if typing.get_origin(args[0]) is tuple else ",") if part.strip()]
        if args[-1] is Ellipsis:
            return tuple(_parse_value(part, args[0]) for part in parts)
        if len(parts) != len(args):
            raise ValueError(f"expected {len(args)} comma-separated values, got {text!r}")
        return tuple(_parse_value(part, kind) for part, kind in zip(parts, args, strict=True))
    if origin is typing.Literal:
        if text not in args:
            raise ValueError(f"choose one of {', '.join(map(str, args))}")
        return text
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError("expected true or false")
        return text.lower() in ("true", "1")
    return kind(text)


def editor_settings(editor: str, items: list[str] | None, **given: Any) -> dict[str, Any]:
    """Editor config overrides from named options (None = not given) and ``--set KEY=VALUE`` items."""
    import typing

    from overtone.editors import EDITORS

    settings = {k: v for k, v in given.items() if v is not None}
    if not items:
        return settings
    if editor not in EDITORS:
        fail(f"unknown editor {editor!r}; available: {', '.join(sorted(EDITORS))}")
    hints = typing.get_type_hints(EDITORS[editor].config_class)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in hints:
            fail(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(hints)} ({editor})")
        if key in settings:
            fail(f"--set {item!r}: {key} is already set (by its own option or an earlier --set)")
        try:
            settings[key] = _parse_value(value, hints[key])
        except (ValueError, TypeError) as exc:
            fail(f"--set {item!r}: {exc}")
    return settings


def build(model: str, device: str, dtype: str, editor: str, objective: str, overtone_cfg: Any,
          settings: dict[str, Any], lm: Any = None) -> tuple[Any, Any]:
    """Load the model (unless given) and build the editor; user errors become clean exits."""
    from overtone.editors import make_editor
    from overtone.models import ArchitectureError, ModelLoadError, load_model
    from overtone.objectives import make_objective

    try:
        lm = lm or load_model(model, device=device, dtype=dtype)
        return lm, make_editor(editor, lm, make_objective(objective, overtone_cfg), **settings)
    except (ModelLoadError, ArchitectureError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))


def progress_bar() -> Progress:
    """A progress bar with a free-text status field."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )


def run_bench(lm: Any, editor: Any, dataset: str, offset: int, limit: int | None, out: Path,
               seed: int, threads: int, label: str, sequence: int = 1, eval_timing: str = "end",
               generation: dict[str, Any] | None = None, batch: int = 1,
               step_budgets: dict[str, int] | None = None, matched: str | None = None) -> dict[str, Any]:
    """Run ``editor`` over a dataset into ``out``: single editing (``sequence`` 1), continual editing, or
    batch editing (``batch`` cases per edit call, within chunks of ``sequence``).

    ``generation`` overrides the settings of generation-based evaluation (MQuAKE); None values are skipped.
    ``step_budgets`` trains each case for exactly its number of updates, taken from run ``matched``
    (recorded in the config); only the cases it has a budget for are run.
    """
    from overtone.benchmarks import TEACHER_FORCED, DatasetError, load_benchmark, resolve_dataset
    from overtone.evaluation import GenerationSettings, make_evaluator
    from overtone.runner import EVAL_TIMINGS, ResultStore, RunError, StoreError, run_continual
    from overtone.runner.config import run_config

    generation = {k: v for k, v in (generation or {}).items() if v is not None}
    try:
        bench = resolve_dataset(dataset)
        if eval_timing not in EVAL_TIMINGS:
            raise ValueError(f"unknown --eval-timing {eval_timing!r}; choose one of {', '.join(EVAL_TIMINGS)}")
        if batch > sequence:
            raise ValueError(f"--batch {batch} needs --sequence >= {batch} (a chunk of T cases holds the batches)")
        if generation and bench.evaluation == TEACHER_FORCED:
            raise ValueError(f"{', '.join(sorted(generation))}: generation settings apply only to generation-based "
                             f"benchmarks (mquake), not to {bench.name}")
        evaluator = make_evaluator(bench.evaluation, lm, GenerationSettings(seed=seed, **generation))
        cases = load_benchmark(dataset, limit=limit, offset=offset)
        if step_budgets is not None:
            cases = [c for c in cases if c.case_id in step_budgets]
        config = run_config(lm, editor, evaluator, bench, dataset, offset, limit, seed, threads, sequence,
                            eval_timing, batch, matched)
        store = ResultStore(out, config)
    except (DatasetError, StoreError, ValueError) as exc:
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
            return run_continual(editor, evaluator, cases, store, sequence, eval_timing, on_case, batch,
                                 step_budgets)
        except RunError as exc:
            fail(str(exc))
