"""Evaluation of edits: the teacher-forced Rel./Gen./Por./Loc. protocol, MQuAKE's generated answers, and
evaluation in the wild (generated answers to every probe, ``wild.py``) beside either or alone."""

from __future__ import annotations

from overtone.benchmarks import MQUAKE_GENERATION, TEACHER_FORCED
from overtone.evaluation.cache import EVAL_CODE_VERSION, EvalCache
from overtone.evaluation.generation import GenerationSettings, MQuAKEEvaluator
from overtone.evaluation.teacher_forced import (
    METRICS,
    AnswerLogits,
    CaseScores,
    Evaluator,
    Predictions,
    PreEdit,
    ProbeBatch,
)
from overtone.evaluation.wild import EVAL_MODES, WILD, WildEvaluator, WildSettings, protocol_records
from overtone.models.loading import LoadedModel


def make_evaluator(evaluation: str, lm: LoadedModel, generation: GenerationSettings | None = None,
                   eval_mode: str = TEACHER_FORCED, wild: WildSettings | None = None,
                   cache: EvalCache | None = None) -> Evaluator:
    """The evaluator of ``--eval``: the benchmark's own (``Benchmark.evaluation``), the wild one, or both; ``cache``:
    where the unedited model's results are read and kept (``--eval-cache``)."""
    if eval_mode not in EVAL_MODES:
        raise ValueError(f"unknown --eval {eval_mode!r}; choose one of {', '.join(EVAL_MODES)}")
    own: Evaluator | None = None
    if TEACHER_FORCED in EVAL_MODES[eval_mode]:
        if evaluation == TEACHER_FORCED:
            own = Evaluator(lm)
        elif evaluation == MQUAKE_GENERATION:
            own = MQuAKEEvaluator(lm, generation)
        else:
            raise ValueError(f"unknown evaluation {evaluation!r}; known: {TEACHER_FORCED}, {MQUAKE_GENERATION}")
    if own is not None:
        own.eval_cache = cache
    if WILD in EVAL_MODES[eval_mode]:
        evaluator: Evaluator = WildEvaluator(lm, wild, inner=own)
        evaluator.eval_cache = cache
        return evaluator
    assert own is not None
    return own


__all__ = [
    "EVAL_CODE_VERSION",
    "EVAL_MODES",
    "METRICS",
    "AnswerLogits",
    "CaseScores",
    "EvalCache",
    "Evaluator",
    "GenerationSettings",
    "MQuAKEEvaluator",
    "PreEdit",
    "Predictions",
    "ProbeBatch",
    "WildEvaluator",
    "WildSettings",
    "make_evaluator",
    "protocol_records",
]
