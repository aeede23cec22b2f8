"""The one runner: a ``RunSpec`` becomes a prepared run, and a prepared run is executed into a run directory.

Every command that edits goes through here (``bench``, ``demo``, ``edit``, ``trace``, a study's worker and
so ``ablate`` and ``sweep``), in three steps:

1. ``check_run(spec)``: with the tokenizer alone, the dataset slice, its probes bounded
   (``benchmarks.bounds``), every case as the editor will edit it (``runner.checks.prepare_cases``) and the
   layers the settings name against the model's ``config.json``, so bad input fails in seconds, before any
   model is loaded;
2. ``prepare_run(spec, inputs, lm)``: the model (unless given), the editor, the evaluator, the ability
   monitor, the number of cases edited at once (a given ``--parallel`` checked against the editor's memory
   model) and the run's ``config.yaml`` (``runner.config.run_config``);
3. ``PreparedRun.execute(store)`` (or, for a study's shards, ``chunk`` and ``window``): the protocol of
   runner/continual.py.

Seeding has one rule (``reseed``): the global generators are seeded from the spec's seed before each
chunk (and each window of parallel cases), so a chunk's records do not depend on what ran before it;
editors derive their own random numbers from their ``seed`` setting and the case ids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from overtone.benchmarks import TEACHER_FORCED, Benchmark, DatasetError, load_benchmark, resolve_dataset
from overtone.benchmarks.bounds import bound_probes
from overtone.benchmarks.cases import EditCase
from overtone.corpus import CorpusError
from overtone.editors import EDITORS, editor_config, make_editor
from overtone.editors.base import Editor, EditStack
from overtone.editors.parallel import CaseMemory, ModelShape, free_memory, parallel_size
from overtone.editors.reports import StepCallback, StepInfo
from overtone.evaluation import EvalCache, GenerationSettings, WildSettings, make_evaluator
from overtone.evaluation.ability import AbilityMonitor, AbilitySettings
from overtone.evaluation.teacher_forced import Evaluator
from overtone.models import ArchitectureError, LoadedModel, ModelLoadError, load_model, load_tokenizer
from overtone.models.loading import load_config
from overtone.objectives import make_objective
from overtone.runner.bench import EditObserver, check_parallel_cases, edit_cases, edit_chunk
from overtone.runner.checks import check_layers, layer_settings, prepare_cases
from overtone.runner.config import run_config
from overtone.runner.continual import PARALLEL_WINDOW, chunk_records, reseed, run_continual
from overtone.runner.spec import RunSpec, SpecError
from overtone.runner.store import ResultStore

log = logging.getLogger(__name__)

# The errors of a bad model, setting, dataset or statistics corpus: a ``SpecError`` naming them.
USER_ERRORS = (ModelLoadError, ArchitectureError, CorpusError, DatasetError, ValueError, FileNotFoundError)


@dataclass(frozen=True)
class RunInputs:
    """What a run edits, checked with the tokenizer alone: the benchmark and its cases as they will be edited."""

    bench: Benchmark | None  # None: the spec's own cases (ad-hoc facts), scored teacher-forced
    cases: list[EditCase]

    @property
    def evaluation(self) -> str:
        return self.bench.evaluation if self.bench is not None else TEACHER_FORCED


def _benchmark(spec: RunSpec) -> tuple[Benchmark | None, list[EditCase]]:
    if spec.cases is not None:
        return None, list(spec.cases)
    return resolve_dataset(spec.dataset), load_benchmark(spec.dataset, limit=spec.limit, offset=spec.offset)


def _check_layers(spec: RunSpec, config: Any) -> None:
    """The layers the editor's settings name, against the model's ``config.json`` (read without the weights);
    a model whose config cannot be read alone is left to the model load to report."""
    if not layer_settings(config):
        return
    try:
        model_config = load_config(spec.model)
    except ModelLoadError as exc:
        log.debug("layers not checked before the model loads: %s", exc)
        return
    check_layers(config, model_config, spec.model)


def check_run(spec: RunSpec, tokenizer: Any = None) -> RunInputs:
    """The spec's dataset slice and every case checked against its editor and evaluation with the tokenizer
    alone (the model's own when ``tokenizer`` is None), probes bounded (``spec.max_probes``, ``spec.probes``)
    and layers against the model's config file; a problem is a ``SpecError`` naming the option or case."""
    try:
        bench, cases = _benchmark(spec)
        if spec.generation and (bench is None or bench.evaluation == TEACHER_FORCED):
            raise SpecError(f"{', '.join(k for k, _ in spec.generation)}: generation settings apply only to "
                            f"generation-based benchmarks (mquake), not to {bench.name if bench else 'facts'}")
        cases = bound_probes(cases, spec.max_probes, spec.probes, spec.seed)
        config = editor_config(spec.editor, **spec.editor_settings)
        _check_layers(spec, config)
        tokenizer = tokenizer or load_tokenizer(spec.model)
        cases = prepare_cases(cases, tokenizer, EDITORS[spec.editor], config, spec.truncate)
        if spec.parallel != 1:
            check_parallel_cases(cases)
    except USER_ERRORS as exc:
        raise SpecError(str(exc)) from exc
    if spec.budgets is not None:
        budgets = dict(spec.budgets)
        cases = [c for c in cases if c.case_id in budgets]
    return RunInputs(bench, cases)


def case_memory(editor: Editor, evaluator: Evaluator, lm: LoadedModel) -> CaseMemory:
    """One case's memory (the editor's model), with what evaluating its edited model holds (the evaluator's)."""
    return replace(editor.case_memory(), evaluation=evaluator.case_memory(ModelShape.of(lm.model.config, lm.dtype)))


def auto_parallel(editor: Editor, evaluator: Evaluator, lm: LoadedModel, cases: int) -> int:
    """The B of ``--parallel auto``, one rule for every run: as many cases as half the free memory holds, and
    few enough that a window of the runner holds ``PARALLEL_WINDOW`` groups to sort by length."""
    return parallel_size(case_memory(editor, evaluator, lm), lm.device, max(1, cases // PARALLEL_WINDOW))


def check_parallel(editor: Editor, evaluator: Evaluator, lm: LoadedModel, parallel: int, cases: int) -> None:
    """A given ``--parallel B`` against the memory model (``case_memory``, an upper estimate): the min(B, cases)
    cases edited at once must fit in the free memory, or a ``SpecError`` says how many do."""
    at_once = min(parallel, cases)
    if at_once <= 1:
        return
    memory, free = case_memory(editor, evaluator, lm), free_memory(lm.device)
    need, fits = memory.total, memory.fits(free)
    if at_once > fits:
        raise SpecError(
            f"--parallel {parallel}: {at_once} cases at once need about "
            f"{(at_once * need + memory.shared) / 2**30:.1f} GiB ({need / 2**20:.0f} MiB each, "
            f"{memory.shared / 2**20:.0f} MiB once, {editor.name}), but {free / 2**30:.1f} GiB is free on "
            f"{lm.device.type}; give --parallel {max(1, fits)} or less, or --parallel auto")


class StepProgress:
    """An ``EditObserver`` that shows the edit in flight, so a long case is seen to progress: ``show(text)`` after
    every step (a progress bar's status field), and a log line every ``every_s`` seconds of one edit call.
    Every call is passed on to ``inner`` (``overtone trace``'s collector)."""

    def __init__(self, show: Callable[[str], None], inner: EditObserver | None = None, every_s: float = 30.0
                 ) -> None:
        self.show, self.inner, self.every_s = show, inner, every_s

    def on_step(self, editor: Editor, cases: Sequence[EditCase]) -> StepCallback:
        inner = self.inner.on_step(editor, cases) if self.inner else None
        started = last = time.monotonic()

        def step(info: StepInfo) -> None:
            nonlocal last
            if inner is not None:
                inner(info)
            ids = list(dict.fromkeys(c.case_id for c in info.cases))
            label = ids[0] if len(ids) == 1 else f"{len(ids)} cases"
            self.show(f"editing {label}: {info.step} updates")
            now = time.monotonic()
            if now - last >= self.every_s:
                last = now
                log.info("%s: still editing, %d updates in %.0f s", label, info.step, now - started)

        return step

    def edited(self, result: Any) -> None:
        if self.inner is not None:
            self.inner.edited(result)


@dataclass
class PreparedRun:
    """A spec with its model, editor, evaluator and ability monitor built: ready to edit its cases."""

    spec: RunSpec
    lm: LoadedModel
    editor: Editor
    evaluator: Evaluator
    cases: list[EditCase]
    ability: AbilityMonitor | None
    parallel: int
    config: dict[str, Any]  # config.yaml

    @property
    def budgets(self) -> dict[str, int] | None:
        return None if self.spec.budgets is None else dict(self.spec.budgets)

    def execute(self, store: ResultStore, on_case: Callable[[dict[str, Any] | None], None] | None = None,
                observer: EditObserver | None = None) -> dict[str, Any]:
        """Edit every chunk not yet in ``store`` (runner/continual.py); the summary of the run's cases.
        ``observer`` sees every edit call (``overtone trace``)."""
        return run_continual(self.editor, self.evaluator, self.cases, store, self.spec.sequence,
                             self.spec.eval_timing, on_case, self.spec.batch, self.budgets, self.spec.strict,
                             ability=self.ability, parallel=self.parallel, seed=self.spec.seed, observer=observer,
                             stream=self.spec.stream_settings)

    def chunk(self, index: int, cases: Sequence[EditCase], budgets: Mapping[str, int] | None = None
              ) -> list[dict[str, Any]]:
        """The records of chunk number ``index`` (a study's shard), as ``execute`` stores them."""
        return chunk_records(self.editor, self.evaluator, index, cases, self.spec.sequence, self.spec.eval_timing,
                             self.spec.batch, budgets, self.ability, seed=self.spec.seed,
                             stream=self.spec.stream_settings)

    def edit_kept(self, stack: EditStack) -> list[dict[str, Any]]:
        """The records of the spec's cases edited in sequence as one chunk, its edits left applied on ``stack``
        (``overtone edit``, which saves them)."""
        reseed(self.spec.seed)
        return edit_chunk(self.editor, self.evaluator, self.cases, self.spec.eval_timing, self.spec.batch,
                          keep=stack)

    def window(self, cases: Sequence[EditCase], budgets: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
        """The records of single-editing cases edited ``parallel`` at a time (a study's shard)."""
        reseed(self.spec.seed)
        return edit_cases(self.editor, self.evaluator, cases, self.parallel, budgets, self.ability)


def prepare_run(spec: RunSpec, inputs: RunInputs | None = None, lm: LoadedModel | None = None) -> PreparedRun:
    """Load the model (unless ``lm``) and build what the run needs; ``inputs`` is ``check_run``'s result
    (made here, with the model's tokenizer, when None). A problem is a ``SpecError``."""
    try:
        lm = lm or load_model(spec.model, device=spec.device, dtype=spec.dtype)
        if inputs is None:
            inputs = check_run(spec, lm.tokenizer)
        editor = make_editor(spec.editor, lm, make_objective(spec.objective, spec.overtone), **spec.editor_settings)
        evaluator = make_evaluator(inputs.evaluation, lm,
                                   GenerationSettings(seed=spec.seed, **dict(spec.generation)), spec.evaluation,
                                   WildSettings(context=spec.eval_context), EvalCache(lm) if spec.eval_cache else None)
        ability = AbilityMonitor(lm, AbilitySettings(every=spec.ability_every)) if spec.measures_ability else None
    except USER_ERRORS as exc:
        raise SpecError(str(exc)) from exc
    if spec.parallel == "auto":
        parallel = auto_parallel(editor, evaluator, lm, len(inputs.cases))
    else:
        parallel = int(spec.parallel)
        check_parallel(editor, evaluator, lm, parallel, len(inputs.cases))
    probes = {"max": spec.max_probes, "mode": spec.probes} if spec.probes != "error" else None
    config = run_config(lm, editor, evaluator, inputs.bench, spec.dataset, spec.offset, spec.limit, spec.seed,
                        spec.threads, spec.sequence, spec.eval_timing, spec.batch, spec.matched,
                        truncate=spec.truncate, ability=ability, parallel=parallel, probes=probes,
                        eval_cache=spec.eval_cache)
    if spec.stream_settings is not None:
        config["stream"] = spec.stream_settings.describe()
    return PreparedRun(spec, lm, editor, evaluator, inputs.cases, ability, int(parallel), config)
