"""The command line's options, declared once: each an ``Annotated`` typer option, and the options that
several commands take together as ``OptionGroup`` dataclasses (a ``grouped`` command takes each group as
one parameter). What the values mean and whether they fit together is checked where a run's
specification is built (``runner.spec.RunSpec``), not here."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import operator
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from overtone.benchmarks.bounds import MAX_PROBES, PROBE_MODES

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
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="number of cases (all when omitted)")]
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
EvalCacheOpt = Annotated[bool, typer.Option(
    "--eval-cache/--no-eval-cache",
    help="read the unedited model's evaluation from the user's cache and keep it there (the same records; "
         "overtone cache info)")]
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
    "--model", help="base model: embedded name, local folder or hub id (default: the embedded model the edit was "
    "made on; the folder or hub id its manifest names only with --trust-manifest-model)")]
TrustModelOpt = Annotated[bool, typer.Option(
    "--trust-manifest-model", help="without --model: load the folder or hub id the edit's manifest names")]
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
MaxProbesOpt = Annotated[int, typer.Option(
    "--max-probes", min=1, metavar="N",
    help="most paraphrases, portability probes and locality probes a case may hold, each (more: see --probes)")]
ProbesOpt = Annotated[str, typer.Option(
    "--probes", callback=_one_of("--probes", PROBE_MODES),
    help="a case over --max-probes: error (refuse it, naming it), cut (keep the first N) or sample (N drawn with "
    "--seed)")]
TruncateOpt = Annotated[bool, typer.Option(
    "--truncate", help="cut edit inputs longer than the editor's max_length to it (default: refuse them)")]


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
    trust_manifest_model: TrustModelOpt = False
    device: DeviceOpt = "auto"
    dtype: BaseDtypeOpt = None
    threads: ThreadsOpt = 1


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

    def switches(self) -> dict[str, bool]:
        """The switches as ``OverToneConfig`` fields (``runner.spec.overtone_for``)."""
        return {"clip": not self.no_clip, "dynamic": not self.static_target, "mode_check": not self.no_mode_check,
                "filter": not self.no_filter}


@dataclass(frozen=True)
class EditorOptions(OptionGroup):
    """The editor settings most often changed, each with its own option (None: the editor's default)."""

    layer: LayerOpt = None
    lr: LrOpt = None
    steps: StepsOpt = None

    def settings(self, editor: str, items: list[str] | None, **more: Any) -> dict[str, Any]:
        """These settings, ``more`` named ones (None: not given) and the ``--set KEY=VALUE`` items
        (``runner.settings.parse_items``), as editor config overrides."""
        from overtone.editors import EDITORS
        from overtone.runner.settings import parse_items

        given = {k: v for k, v in {**dataclasses.asdict(self), **more}.items() if v is not None}
        if not items or editor not in EDITORS:  # an unknown editor is named by the run's spec
            return given
        return {**given, **parse_items(items, EDITORS[editor].config_class, editor, given)}


@dataclass(frozen=True)
class EvalOptions(OptionGroup):
    """How edits are scored: the evaluation protocol, the wild evaluation's context, the evaluation cache."""

    evaluation: EvalOpt = "teacher-forced"
    eval_context: EvalContextOpt = "bare"
    eval_cache: EvalCacheOpt = True


@dataclass(frozen=True)
class ExecutionOptions(OptionGroup):
    """Where a study's cells run: the executor, its cluster and workers, and the unit of work."""

    executor: ExecutorOpt = "local"
    address: AddressOpt = None
    workers: WorkersOpt = None
    shard_size: ShardOpt = 4


@dataclass(frozen=True)
class GenerationOptions(OptionGroup):
    """MQuAKE's generation settings; None keeps the evaluation's default."""

    single_hop_tokens: SingleTokensOpt = None
    multi_hop_tokens: MultiTokensOpt = None
    multi_hop_questions: MultiQuestionsOpt = None
    temperature: TemperatureOpt = None


StreamOpt = Annotated[bool, typer.Option(
    "--stream", help="lifelong editing: each chunk of --sequence T is an edit stream, checkpointed and resumed after "
    "a kill, scored with the lifelong metrics too (docs/lifelong-streams.md)")]
CheckpointEveryOpt = Annotated[int, typer.Option(
    "--checkpoint-every", min=0, metavar="K", help="--stream: save the stream's edits every K batches (0: never)")]
CurveEveryOpt = Annotated[int, typer.Option(
    "--curve-every", min=0, metavar="K", help="--stream: score a fixed sample of the earlier edits every K edits")]
CurveSampleOpt = Annotated[int, typer.Option(
    "--curve-sample", min=1, metavar="N", help="--stream: earlier edits scored at each curve point")]
FluencyTokensOpt = Annotated[int, typer.Option(
    "--fluency-tokens", min=0, help="--stream: greedy tokens generated per rewrite prompt for the fluency (0: none)")]
FluencyEveryOpt = Annotated[int, typer.Option(
    "--fluency-every", min=1, metavar="K", help="--stream: the fluency of every K-th edit scored, the first "
    "included (1: every edit, the protocol; the reference's generation_test_interval)")]


@dataclass(frozen=True)
class StreamOptions(OptionGroup):
    """Edit streams (lifelong editing): checkpoints and the curve; defaults are ``runner.stream.StreamSettings``'."""

    stream: StreamOpt = False
    checkpoint_every: CheckpointEveryOpt = 10
    curve_every: CurveEveryOpt = 0
    curve_sample: CurveSampleOpt = 100
    fluency_tokens: FluencyTokensOpt = 32
    fluency_every: FluencyEveryOpt = 1


@dataclass(frozen=True)
class ProbeOptions(OptionGroup):
    """The bound on each case's probes and what happens to a case over it (``benchmarks.bounds``)."""

    max_probes: MaxProbesOpt = MAX_PROBES
    probes: ProbesOpt = "error"
