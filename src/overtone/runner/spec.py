"""A run's specification: everything a run of an editor over cases depends on, checked once, when it is built.

``bench``, ``demo``, ``edit``, ``trace`` and every study cell (so ``ablate`` and ``sweep``) describe their
run as a ``RunSpec`` and hand it to the runner (runner/run.py). Its checks need no tokenizer and no model
(those that do are ``run.check_run``); a problem is a ``SpecError`` naming the option.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from overtone.benchmarks.bounds import MAX_PROBES, PROBE_MODES
from overtone.benchmarks.cases import EditCase
from overtone.evaluation.wild import CONTEXTS, EVAL_MODES
from overtone.objectives import OBJECTIVES, OverToneConfig
from overtone.runner.bench import EVAL_TIMINGS
from overtone.runner.settings import SettingError, check_finite
from overtone.runner.stream import StreamSettings

STREAM_FIELDS = tuple(f.name for f in fields(StreamSettings))  # a spec's stream options, as given


class SpecError(ValueError):
    """A run cannot be made as specified; the message names the option or record."""


def parse_parallel(value: int | str) -> int | str:
    """``--parallel``: a number of cases >= 1, or ``auto``."""
    if value == "auto":
        return value
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise SpecError(f"--parallel takes a number of cases or auto, got {value!r}") from None
    if number < 1:
        raise SpecError(f"--parallel must be >= 1, got {number}")
    return number


def overtone_for(editor: str, ablation: dict[str, bool] | None = None, **given: float | None) -> OverToneConfig:
    """OverTone settings: the editor's tuned defaults, overridden by ``given`` (None: not given) and the
    ablation switches (``clip``, ``dynamic``, ``mode_check``, ``filter``)."""
    from overtone.editors import EDITORS

    base = EDITORS[editor].overtone_defaults if editor in EDITORS else OverToneConfig()
    try:
        return replace(base, **{k: v for k, v in given.items() if v is not None}, **(ablation or {}))
    except ValueError as exc:
        raise SpecError(str(exc)) from exc


@dataclass(frozen=True)
class RunSpec:
    """One run: the model, the cases, the editor and its objective, the protocol and the evaluation.

    ``cases`` are ad-hoc cases (``overtone edit``'s facts) used instead of ``dataset``'s; ``parallel``
    cases are edited at once in single editing (``auto``: runner.run.auto_parallel); ``budgets`` train
    each case for exactly its number of updates, taken from run ``matched``. A case holds at most
    ``max_probes`` paraphrases, portability and locality probes each; ``probes`` says what happens to more
    (``benchmarks.bounds``: refused, cut or sampled with the seed). ``eval_cache``: the unedited model's
    evaluation is read from (and kept in) the user's cache; records are the same either way.
    """

    editor: str
    dataset: str = "zsre"
    objective: str = "overtone"
    model: str = "smollm2-135m"
    device: str = "auto"
    dtype: str = "fp32"
    threads: int = 1
    offset: int = 0
    limit: int | None = None
    cases: tuple[EditCase, ...] | None = None
    settings: tuple[tuple[str, Any], ...] = ()  # editor config overrides
    overtone: OverToneConfig | None = None  # None: the editor's tuned defaults
    sequence: int = 1
    batch: int = 1
    eval_timing: str = "end"
    evaluation: str = "teacher-forced"
    eval_context: str = "bare"
    generation: tuple[tuple[str, Any], ...] = ()  # MQuAKE's generation settings given (None values dropped)
    ability: bool = False
    ability_every: int = 0
    parallel: int | str = 1
    seed: int = 0
    strict: bool = False
    truncate: bool = False
    max_probes: int = MAX_PROBES
    probes: str = "error"
    matched: str | None = None
    eval_cache: bool = True  # read and keep the unedited model's evaluation in the cache (evaluation/cache.py)
    stream: bool = False  # each chunk is an edit stream: checkpointed, with curves (runner/stream.py)
    checkpoint_every: int = StreamSettings.checkpoint_every
    curve_every: int = StreamSettings.curve_every
    curve_sample: int = StreamSettings.curve_sample
    fluency_tokens: int = StreamSettings.fluency_tokens
    fluency_every: int = StreamSettings.fluency_every
    budgets: tuple[tuple[str, int], ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from overtone.editors import EDITORS

        if self.editor not in EDITORS:
            raise SpecError(f"unknown editor {self.editor!r}; available: {', '.join(sorted(EDITORS))}")
        if self.objective not in OBJECTIVES:
            raise SpecError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.overtone is None:
            object.__setattr__(self, "overtone", EDITORS[self.editor].overtone_defaults)
        object.__setattr__(self, "settings", tuple(sorted(dict(self.settings).items())))
        object.__setattr__(self, "generation",
                           tuple(sorted((k, v) for k, v in dict(self.generation).items() if v is not None)))
        parallel = parse_parallel(self.parallel)
        object.__setattr__(self, "parallel", parallel)
        if self.threads < 1 or self.offset < 0:
            raise SpecError("--threads must be >= 1 and --offset >= 0")
        if self.limit is not None and self.limit < 1:
            raise SpecError(f"--limit must be >= 1, got {self.limit} (leave it out for every case)")
        if self.max_probes < 1:
            raise SpecError(f"--max-probes must be >= 1, got {self.max_probes}")
        if self.probes not in PROBE_MODES:
            raise SpecError(f"unknown --probes {self.probes!r}; choose one of {', '.join(PROBE_MODES)}")
        self._check_settings()
        if self.sequence < 1 or self.batch < 1:
            raise SpecError("--sequence and --batch must be >= 1")
        if self.eval_timing not in EVAL_TIMINGS:
            raise SpecError(f"unknown --eval-timing {self.eval_timing!r}; choose one of {', '.join(EVAL_TIMINGS)}")
        if self.batch > self.sequence:
            raise SpecError(f"--batch {self.batch} needs --sequence >= {self.batch} (a chunk of T cases holds the "
                            "batches)")
        if self.evaluation not in EVAL_MODES:
            raise SpecError(f"unknown --eval {self.evaluation!r}; choose one of {', '.join(EVAL_MODES)}")
        if self.eval_context not in CONTEXTS:
            raise SpecError(f"unknown --eval-context {self.eval_context!r}; choose one of {', '.join(CONTEXTS)}")
        if self.eval_context != "bare" and self.evaluation == "teacher-forced":
            raise SpecError(f"--eval-context {self.eval_context} applies to the wild evaluation: add --eval wild or "
                            "both")
        if self.generation and self.evaluation == "wild":
            raise SpecError(f"{', '.join(k for k, _ in self.generation)}: MQuAKE's generation settings need --eval "
                            "teacher-forced or both")
        if self.ability_every < 0:
            raise SpecError(f"--ability-every must be >= 0, got {self.ability_every}")
        if self.ability_every and self.ability_every >= self.sequence:
            raise SpecError(f"--ability-every {self.ability_every} measures within a chunk of --sequence "
                            f"{self.sequence} edits: give K below T (the chunk's end is measured anyway with "
                            "--ability)")
        self._check_stream()
        if parallel != 1:
            if self.sequence > 1 or self.batch > 1:
                raise SpecError(f"--parallel {parallel} edits independent cases (single editing); the cases of a "
                                f"--sequence {self.sequence} / --batch {self.batch} chunk build on each other: use "
                                "--parallel 1")
            refusal = EDITORS[self.editor].parallel_refusal
            if refusal:
                raise SpecError(f"--parallel {parallel}: editor {self.editor} edits one case at a time: {refusal}")

    def _check_settings(self) -> None:
        """Every number finite, and the editor's settings in their ranges (its config's own checks): no model
        needed, so a bad value is refused before anything is loaded or written."""
        from overtone.editors import editor_config

        try:
            check_finite(self.editor_settings, "editor setting")
            check_finite(asdict(self.overtone), "OverTone setting")
            check_finite(dict(self.generation), "generation setting")
            editor_config(self.editor, **self.editor_settings)
        except (SettingError, ValueError) as exc:
            raise SpecError(str(exc)) from exc


    def _check_stream(self) -> None:
        given = [f"--{name.replace('_', '-')}" for name in STREAM_FIELDS
                 if getattr(self, name) != getattr(StreamSettings, name)]
        if not self.stream:
            if given:
                raise SpecError(f"{', '.join(given)} set(s) an edit stream: add --stream")
            return
        if self.sequence < 2:
            raise SpecError("--stream edits each chunk of --sequence T cases as one stream: give T >= 2 (e.g. "
                            "--sequence 10000 --batch 100)")
        if self.eval_timing != "end":
            raise SpecError("--stream evaluates every edit on the stream's final model: --eval-timing must be end")
        if self.matched:
            raise SpecError("--stream edits batches of cases: matched steps (--matched) need single or continual "
                            "editing")
        try:
            StreamSettings(**{name: getattr(self, name) for name in STREAM_FIELDS})
        except ValueError as exc:
            raise SpecError(str(exc)) from exc

    @property
    def stream_settings(self) -> StreamSettings | None:
        """The stream's settings (None: chunks are edited as continual editing does, runner/continual.py)."""
        if not self.stream:
            return None
        return StreamSettings(**{name: getattr(self, name) for name in STREAM_FIELDS})

    @property
    def editor_settings(self) -> dict[str, Any]:
        return dict(self.settings)

    @property
    def measures_ability(self) -> bool:
        return self.ability or self.ability_every > 0
