"""The one runner: a ``RunSpec`` becomes a prepared run, and a prepared run is executed into a run directory.

Every command that edits goes through here (``bench``, ``demo``, ``edit``, ``trace``, a study's worker and
so ``ablate`` and ``sweep``), in three steps:

1. ``check_run(spec)``: with the tokenizer alone, the dataset slice and every case as the editor will edit
   it (``runner.checks.prepare_cases``), so bad input fails in seconds, before any model is loaded;
2. ``prepare_run(spec, inputs, lm)``: the model (unless given), the editor, the evaluator, the ability
   monitor, the number of cases edited at once and the run's ``config.yaml`` (``runner.config.run_config``);
3. ``PreparedRun.execute(store)`` (or, for a study's shards, ``chunk`` and ``window``): the protocol of
   runner/continual.py.

Seeding has one rule (``reseed``): the global generators are seeded from the spec's seed before each
chunk (and each window of parallel cases), so a chunk's records do not depend on what ran before it;
editors derive their own random numbers from their ``seed`` setting and the case ids.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from overtone.benchmarks import TEACHER_FORCED, Benchmark, DatasetError, load_benchmark, resolve_dataset
from overtone.benchmarks.cases import EditCase
from overtone.corpus import CorpusError
from overtone.editors import EDITORS, editor_config, make_editor
from overtone.editors.base import Editor, EditStack
from overtone.editors.parallel import parallel_size
from overtone.evaluation import GenerationSettings, WildSettings, make_evaluator
from overtone.evaluation.ability import AbilityMonitor, AbilitySettings
from overtone.evaluation.teacher_forced import Evaluator
from overtone.models import ArchitectureError, LoadedModel, ModelLoadError, load_model, load_tokenizer
from overtone.objectives import make_objective
from overtone.runner.bench import EditObserver, check_parallel_cases, edit_cases, edit_chunk
from overtone.runner.checks import prepare_cases
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


def check_run(spec: RunSpec, tokenizer: Any = None) -> RunInputs:
    """The spec's dataset slice and every case checked against its editor and evaluation with the tokenizer
    alone (the model's own when ``tokenizer`` is None); a problem is a ``SpecError`` naming the option or case."""
    try:
        bench, cases = _benchmark(spec)
        if spec.generation and (bench is None or bench.evaluation == TEACHER_FORCED):
            raise SpecError(f"{', '.join(k for k, _ in spec.generation)}: generation settings apply only to "
                            f"generation-based benchmarks (mquake), not to {bench.name if bench else 'facts'}")
        config = editor_config(spec.editor, **spec.editor_settings)
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


def auto_parallel(editor: Editor, lm: LoadedModel, cases: int) -> int:
    """The B of ``--parallel auto``, one rule for every run: as many cases as half the free memory holds, and
    few enough that a window of the runner holds ``PARALLEL_WINDOW`` groups to sort by length."""
    return parallel_size(editor.case_memory(), lm.device, max(1, cases // PARALLEL_WINDOW))


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
                                   WildSettings(context=spec.eval_context))
        ability = AbilityMonitor(lm, AbilitySettings(every=spec.ability_every)) if spec.measures_ability else None
    except USER_ERRORS as exc:
        raise SpecError(str(exc)) from exc
    parallel = spec.parallel if spec.parallel != "auto" else auto_parallel(editor, lm, len(inputs.cases))
    config = run_config(lm, editor, evaluator, inputs.bench, spec.dataset, spec.offset, spec.limit, spec.seed,
                        spec.threads, spec.sequence, spec.eval_timing, spec.batch, spec.matched,
                        truncate=spec.truncate, ability=ability, parallel=int(parallel))
    if spec.stream_settings is not None:
        config["stream"] = spec.stream_settings.describe()
    return PreparedRun(spec, lm, editor, evaluator, inputs.cases, ability, int(parallel), config)
