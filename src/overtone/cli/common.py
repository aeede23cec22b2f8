"""Options and helpers shared by the commands: declared once, used everywhere."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import operator
import random
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
EVAL_CHOICES = ("teacher-forced", "wild", "both")  # evaluation.wild.EVAL_MODES, without importing torch here
EVAL_CONTEXTS = ("bare", "qa")


def _one_of(option: str, choices: tuple[str, ...]) -> Any:
    def check(value: str) -> str:
        if value not in choices:
            raise typer.BadParameter(f"{value!r}: choose one of {', '.join(choices)}", param_hint=option)
        return value

    return check


EvalOpt = Annotated[str, typer.Option(
    "--eval", callback=_one_of("--eval", EVAL_CHOICES),
    help="teacher-forced (the benchmark's own protocol), wild (generated answers, exact match) or both")]
EvalContextOpt = Annotated[str, typer.Option(
    "--eval-context", callback=_one_of("--eval-context", EVAL_CONTEXTS),
    help="wild: the bare probe prompt, or qa (the study's QA instruction in the chat template)")]
AbilityOpt = Annotated[bool, typer.Option(
    "--ability", help="measure held-out perplexity and general facts at the end of each chunk (continual editing)")]
AbilityEveryOpt = Annotated[int, typer.Option(
    "--ability-every", min=0, metavar="K",
    help="and after every K edits within a chunk (implies --ability; K below --sequence): the drift curve")]
BatchOpt = Annotated[int, typer.Option(
    "--batch", min=1, help="batch editing: B cases per edit call within each chunk of --sequence T (MEMIT)")]
FactsOpt = Annotated[Path | None, typer.Option(
    "--facts", help="facts to edit: JSON, JSON Lines or CSV with prompt, target and optional subject, paraphrases, "
    "locality (or any dataset file in a known format, see overtone datasets)")]
SaveOpt = Annotated[Path | None, typer.Option("--save", help="save the edit as an artifact folder (a new folder)")]
EditDirsArg = Annotated[list[Path], typer.Argument(
    help="edit artifact folders (overtone edit --save), applied in order")]
BaseModelOpt = Annotated[str | None, typer.Option(
    "--model", help="base model: embedded name, local folder or hub id (default: the one the edit was made on)")]
BaseDtypeOpt = Annotated[str | None, typer.Option("--dtype", help="fp32 or bf16 (default: the edit's)")]
MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="tokens to generate")]
ShowOpt = Annotated[int, typer.Option("--show", min=0, help="cases whose completions are printed")]
ParallelOpt = Annotated[str, typer.Option(
    "--parallel", help="single editing: edit B cases at once, each against the unedited model (the results of one "
    "at a time, up to float rounding); auto: as many as half the free memory holds")]
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
StrictOpt = Annotated[bool, typer.Option(
    "--strict", help="stop with an error when an edit diverges (default: record it as diverged and warn)")]
TruncateOpt = Annotated[bool, typer.Option(
    "--truncate", help="cut edit inputs longer than the editor's max_length to it (default: refuse them)")]


class OptionGroup:
    """Options that several commands take together, declared once as the fields of a frozen dataclass: each
    field's ``Annotated`` type is its typer option and its default the option's default; a field may be a
    group itself (its default from ``field(default_factory=...)``). A command made ``grouped`` takes the group
    as one parameter."""


def _is_group(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, OptionGroup)


def _expand(kind: type, defaults: Any) -> tuple[list[inspect.Parameter], Callable[[dict[str, Any]], Any]]:
    """The options of group ``kind`` with the values of ``defaults`` as defaults, and what builds the group
    from the parsed options (taking them out of the dict it is given)."""
    hints = typing.get_type_hints(kind, include_extras=True)
    params: list[inspect.Parameter] = []
    parts: dict[str, Callable[[dict[str, Any]], Any]] = {}
    for field in dataclasses.fields(kind):
        value, annotation = getattr(defaults, field.name), hints[field.name]
        if _is_group(annotation):
            inner, parts[field.name] = _expand(annotation, value)
            params += inner
        else:
            params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=value,
                                            annotation=annotation))
            parts[field.name] = operator.methodcaller("pop", field.name)
    return params, lambda given: kind(**{name: part(given) for name, part in parts.items()})


def grouped(command: Callable[..., Any]) -> Callable[..., Any]:
    """Let typer see each ``OptionGroup`` parameter of ``command`` as the group's options, in its place (flags,
    help and order as if written out), and hand ``command`` one group object built from them."""
    hints = typing.get_type_hints(command, include_extras=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, Callable[[dict[str, Any]], Any]] = {}
    for param in inspect.signature(command).parameters.values():
        kind = hints.get(param.name, param.annotation)
        if not _is_group(kind):
            params.append(param.replace(annotation=kind, kind=inspect.Parameter.KEYWORD_ONLY))
            continue
        defaults = kind() if param.default is inspect.Parameter.empty else param.default
        inner, groups[param.name] = _expand(kind, defaults)
        params += inner
    names = [p.name for p in params]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise TypeError(f"{command.__name__}: options named twice: {', '.join(twice)}")

    @functools.wraps(command)
    def run(**given: Any) -> Any:
        for name, build_group in groups.items():
            given[name] = build_group(given)
        return command(**given)

    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]  # what typer reads
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run


@dataclass(frozen=True)
class ModelOptions(OptionGroup):
    """The model to load, where and how, and the torch threads."""

    model: ModelOpt = "smollm2-135m"
    device: DeviceOpt = "auto"
    dtype: DtypeOpt = "fp32"
    threads: ThreadsOpt = 1


@dataclass(frozen=True)
class BaseModelOptions(OptionGroup):
    """The model that saved edits go on: by default the one they were made on, in its dtype."""

    model: BaseModelOpt = None
    device: DeviceOpt = "auto"
    dtype: BaseDtypeOpt = None
    threads: ThreadsOpt = 1

    def load(self, artifacts: list[Any]) -> Any:
        """The model, loaded (``load_base``)."""
        return load_base(artifacts, self.model, self.device, self.dtype)


@dataclass(frozen=True)
class OverToneOptions(OptionGroup):
    """OverTone's hyper-parameters; None keeps the editor's tuned default."""

    lam: LambdaOpt = None
    n_sigma: NSigmaOpt = None
    epsilon: EpsilonOpt = None

    def given(self) -> dict[str, float]:
        """The hyper-parameters given on the command line."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class AblationOptions(OptionGroup):
    """The paper's ablation switches, each turning off one part of OverTone."""

    no_clip: NoClipOpt = False
    static_target: StaticOpt = False
    no_mode_check: NoCheckOpt = False
    no_filter: NoFilterOpt = False


@dataclass(frozen=True)
class EditorOptions(OptionGroup):
    """The editor settings most often changed, each with its own option (None: the editor's default)."""

    layer: LayerOpt = None
    lr: LrOpt = None
    steps: StepsOpt = None

    def settings(self, editor: str, items: list[str] | None, **more: Any) -> dict[str, Any]:
        """These settings, ``more`` named ones and the ``--set KEY=VALUE`` items, as ``editor_settings``."""
        return editor_settings(editor, items, **dataclasses.asdict(self), **more)


@dataclass(frozen=True)
class EvalOptions(OptionGroup):
    """How edits are scored: the evaluation protocol and the wild evaluation's context."""

    evaluation: EvalOpt = "teacher-forced"
    eval_context: EvalContextOpt = "bare"


@dataclass(frozen=True)
class ExecutionOptions(OptionGroup):
    """Where a study's cells run: the executor, its cluster and workers, and the unit of work."""

    executor: ExecutorOpt = "local"
    address: AddressOpt = None
    workers: WorkersOpt = None
    shard_size: ShardOpt = 4


def setup(threads: int, seed: int, verbose: bool) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    from overtone.runner.signals import raise_on_signals

    raise_on_signals()  # SIGINT/SIGTERM revert the weights and end the run cleanly (exit_on_interrupt)

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
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)  # one line, however long
    raise typer.Exit(code=2)


def parallel_option(value: str, editor: str, sequence: int = 1, batch: int = 1) -> int | str:
    """``--parallel``, checked before the model loads: a number >= 1 or ``auto``; more than one case at a time
    needs single editing and an editor that can edit cases side by side."""
    from overtone.editors import EDITORS

    if value != "auto":
        try:
            number = int(value)
        except ValueError:
            fail(f"--parallel takes a number of cases or auto, got {value!r}")
        if number < 1:
            fail(f"--parallel must be >= 1, got {number}")
        if number == 1:
            return 1
    if sequence > 1 or batch > 1:
        fail(f"--parallel {value} edits independent cases (single editing); the cases of a --sequence {sequence} "
             f"/ --batch {batch} chunk build on each other: use --parallel 1")
    refusal = EDITORS[editor].parallel_refusal if editor in EDITORS else None
    if refusal:
        fail(f"--parallel {value}: editor {editor} edits one case at a time: {refusal}")
    return value if value == "auto" else int(value)


def overtone_config(editor: str, overtone: OverToneOptions | None = None,
                    ablation: AblationOptions | None = None) -> Any:
    """OverTone settings: the editor's tuned defaults, overridden by what the user gave."""
    from dataclasses import replace

    from overtone.editors import EDITORS
    from overtone.objectives import OverToneConfig

    base = EDITORS[editor].overtone_defaults if editor in EDITORS else OverToneConfig()
    off = ablation or AblationOptions()
    try:
        return replace(base, **(overtone or OverToneOptions()).given(), clip=not off.no_clip,
                       dynamic=not off.static_target, mode_check=not off.no_mode_check, filter=not off.no_filter)
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


def build(model: ModelOptions, editor: str, objective: str, overtone_cfg: Any, settings: dict[str, Any],
          lm: Any = None) -> tuple[Any, Any]:
    """Load the model (unless given) and build the editor; user errors become clean exits."""
    from overtone.editors import make_editor
    from overtone.models import ArchitectureError, ModelLoadError, load_model
    from overtone.objectives import make_objective

    try:
        lm = lm or load_model(model.model, device=model.device, dtype=model.dtype)
        return lm, make_editor(editor, lm, make_objective(objective, overtone_cfg), **settings)
    except (ModelLoadError, ArchitectureError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))


@dataclass
class RunInputs:
    """What a run edits, checked before the model is loaded: the dataset, its cases as edited, the options."""

    bench: Any  # benchmarks.Benchmark
    cases: list[Any]  # EditCase, after the editor's checks (cut with --truncate)
    generation: Any  # evaluation.GenerationSettings
    truncate: bool
    evaluation: str = "teacher-forced"  # --eval
    wild: Any = None  # evaluation.WildSettings


def check_inputs(tokenizer: Any, editor: str, config: Any, dataset: str, offset: int, limit: int | None,
                 seed: int = 0, sequence: int = 1, eval_timing: str = "end", generation: dict[str, Any] | None = None,
                 batch: int = 1, truncate: bool = False, evaluation: str = "teacher-forced",
                 eval_context: str = "bare") -> RunInputs:
    """Check options, the dataset slice and every case (editor limits, ROME/MEMIT subjects, probes) with the
    tokenizer alone, so that bad input fails in seconds; user errors become clean exits."""
    from overtone.benchmarks import TEACHER_FORCED, DatasetError, load_benchmark, resolve_dataset
    from overtone.editors import EDITORS
    from overtone.evaluation import GenerationSettings, WildSettings
    from overtone.runner import EVAL_TIMINGS
    from overtone.runner.checks import prepare_cases

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
        if generation and evaluation == "wild":
            raise ValueError(f"{', '.join(sorted(generation))}: MQuAKE's generation settings need --eval "
                             "teacher-forced or both")
        if eval_context != "bare" and evaluation == "teacher-forced":
            raise ValueError(f"--eval-context {eval_context} applies to the wild evaluation: add --eval wild or both")
        wild = WildSettings(context=eval_context)
        settings = GenerationSettings(seed=seed, **generation)
        cases = prepare_cases(load_benchmark(dataset, limit=limit, offset=offset), tokenizer, EDITORS[editor], config,
                              truncate)
    except (DatasetError, ValueError) as exc:
        fail(str(exc))
    return RunInputs(bench, cases, settings, truncate, evaluation, wild)


def _tokenizer_and_config(model: str, editor: str, settings: dict[str, Any]) -> tuple[Any, Any]:
    from overtone.editors import editor_config
    from overtone.models import ModelLoadError, load_tokenizer

    try:
        return load_tokenizer(model), editor_config(editor, **settings)
    except (ModelLoadError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))


def precheck(model: str, editor: str, settings: dict[str, Any], dataset: str, offset: int, limit: int | None,
             parallel: int | str = 1, **options: Any) -> RunInputs:
    """``check_inputs`` with the model's tokenizer and the editor's settings, before the model is loaded;
    with ``parallel`` != 1 also that every case is one edit (``runner.bench.check_parallel_cases``)."""
    from overtone.runner.bench import check_parallel_cases

    tokenizer, config = _tokenizer_and_config(model, editor, settings)
    inputs = check_inputs(tokenizer, editor, config, dataset, offset, limit, **options)
    if parallel != 1:
        try:
            check_parallel_cases(inputs.cases)
        except ValueError as exc:
            fail(str(exc))
    return inputs


def precheck_cases(model: str, editor: str, settings: dict[str, Any], cases: list[Any]) -> list[Any]:
    """Ad-hoc cases checked as a run's are (``check_inputs``), before the model is loaded."""
    from overtone.editors import EDITORS
    from overtone.runner.checks import prepare_cases

    tokenizer, config = _tokenizer_and_config(model, editor, settings)
    try:
        return prepare_cases(cases, tokenizer, EDITORS[editor], config)
    except ValueError as exc:
        fail(str(exc))


def hold_run_dir(out: Path) -> Any:
    """The lock of run directory ``out`` (``runner.store.RunLock``), or a clean exit naming its holder."""
    from overtone.runner import StoreError
    from overtone.runner.store import RunLock

    try:
        return RunLock(out).acquire()
    except StoreError as exc:
        fail(str(exc))


@contextmanager
def exit_on_interrupt(out: Path) -> Iterator[None]:
    """Turn SIGINT/SIGTERM into a one-line message and exit status 128 + signal; the weights were reverted by
    then (editors and ``edit_chunk`` restore them on any exception) and finished cases are on disk."""
    from overtone.runner import StoreError, read_run
    from overtone.runner.signals import Interrupted

    try:
        yield
    except KeyboardInterrupt as exc:
        name, code = (exc.name, exc.exit_code) if isinstance(exc, Interrupted) else ("SIGINT", 130)
        try:
            saved = f"{len(read_run(out)[1])} finished cases are saved in {out}"
        except (StoreError, OSError, ValueError):
            saved = "no case was finished"
        console.print(f"[bold red]interrupted[/] by {name}: {saved}; rerun the same command to resume",
                      soft_wrap=True)
        raise typer.Exit(code=code) from None


def progress_bar() -> Progress:
    """A progress bar with a free-text status field."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )


def run_bench(lm: Any, editor: Any, dataset: str, offset: int, limit: int | None, out: Path,
              seed: int, threads: int, label: str, sequence: int = 1, eval_timing: str = "end",
              generation: dict[str, Any] | None = None, batch: int = 1,
              step_budgets: dict[str, int] | None = None, matched: str | None = None, *,
              inputs: RunInputs | None = None, lock: Any = None, strict: bool = False,
              evaluation: str = "teacher-forced", eval_context: str = "bare", ability: bool = False,
              ability_every: int = 0, parallel: int | str = 1) -> dict[str, Any]:
    """Run ``editor`` over a dataset into ``out``: single editing (``sequence`` 1), continual editing, or
    batch editing (``batch`` cases per edit call, within chunks of ``sequence``).

    ``generation`` overrides the settings of generation-based evaluation (MQuAKE); None values are skipped.
    ``step_budgets`` trains each case for exactly its number of updates, taken from run ``matched``
    (recorded in the config); only the cases it has a budget for are run.
    ``inputs``: the result of ``precheck`` (else the inputs are checked here, with the loaded model's
    tokenizer); ``lock``: the directory's ``RunLock`` when the caller took it before loading the model;
    ``strict``: a diverged edit stops the run. ``evaluation`` is ``--eval`` (the benchmark's own protocol,
    wild, or both) with the wild ``eval_context`` (both taken from ``inputs`` when given); ``ability``
    measures the general ability at the end of each chunk, and after every ``ability_every`` edits within
    it when that is set. ``parallel``: single-editing cases edited at once
    (a number, or ``auto`` from free memory; see ``parallel_option``).
    """
    from overtone.corpus import CorpusError
    from overtone.editors.parallel import parallel_size
    from overtone.evaluation import make_evaluator
    from overtone.evaluation.ability import AbilityMonitor, AbilitySettings
    from overtone.runner import ResultStore, RunError, StoreError, run_continual
    from overtone.runner.bench import check_parallel_cases
    from overtone.runner.config import run_config
    from overtone.runner.continual import PARALLEL_WINDOW

    if inputs is None:
        inputs = check_inputs(lm.tokenizer, editor.name, editor.config, dataset, offset, limit, seed, sequence,
                              eval_timing, generation, batch, evaluation=evaluation, eval_context=eval_context)
    bench, cases = inputs.bench, inputs.cases
    if step_budgets is not None:
        cases = [c for c in cases if c.case_id in step_budgets]
    if parallel != 1:
        try:
            check_parallel_cases(cases)
        except ValueError as exc:
            fail(str(exc))
    if parallel == "auto":  # a window of the runner then holds PARALLEL_WINDOW groups to sort by length
        parallel = parallel_size(editor.case_memory(), lm.device, max(1, len(cases) // PARALLEL_WINDOW))
    evaluator = make_evaluator(bench.evaluation, lm, inputs.generation, inputs.evaluation, inputs.wild)
    try:
        monitor = AbilityMonitor(lm, AbilitySettings(every=ability_every)) if ability or ability_every else None
    except CorpusError as exc:
        fail(str(exc))
    config = run_config(lm, editor, evaluator, bench, dataset, offset, limit, seed, threads, sequence, eval_timing,
                        batch, matched, truncate=inputs.truncate, ability=monitor, parallel=parallel)
    try:
        store = ResultStore(out, config, lock)
    except StoreError as exc:
        fail(str(exc))
    with store:
        if store.done:
            log.info("%s: resuming, %d cases already done", out, len(store.done & {c.case_id for c in cases}))
        with progress_bar() as progress:
            task = progress.add_task(label, total=len(cases), status="")

            def on_case(record: dict[str, Any] | None) -> None:
                status = ""
                if record is not None:
                    scores = [f"{name} {100 * part['post']['rel']:.0f}" for name, part in
                              (("rel", record), ("wild rel", record.get("wild"))) if part and "post" in part]
                    status = f"{' '.join(scores)} steps {record['steps']} {record['edit_s'] + record['eval_s']:.1f}s"
                progress.update(task, advance=1, status=status)

            try:
                return run_continual(editor, evaluator, cases, store, sequence, eval_timing, on_case, batch,
                                     step_budgets, strict, ability=monitor, parallel=int(parallel))
            except RunError as exc:
                fail(str(exc))


def load_artifacts(paths: list[Path]) -> list[Any]:
    """The edit artifacts at ``paths``; a bad folder is a clean exit naming it."""
    from overtone.artifacts import ArtifactError, load_edit

    try:
        return [load_edit(path) for path in paths]
    except ArtifactError as exc:
        fail(str(exc))


def load_base(artifacts: list[Any], model: str | None, device: str, dtype: str | None) -> Any:
    """The model to apply ``artifacts`` to: ``model``, else the one the first edit was made on, in its dtype."""
    from overtone.models import DEFAULT_MODEL, ModelLoadError, load_model
    from overtone.models.loading import DTYPES

    if dtype is None and artifacts:
        saved = artifacts[0].manifest["model"]["dtype"]
        dtype = next((name for name, value in DTYPES.items() if str(value) == f"torch.{saved}"), "fp32")
    source = model or (artifacts[0].model_source if artifacts else DEFAULT_MODEL)
    try:
        return load_model(source, device=device, dtype=dtype or "fp32")
    except (ModelLoadError, ValueError) as exc:
        fail(str(exc))
