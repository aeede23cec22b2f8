"""Evaluation of edits: the teacher-forced Rel./Gen./Por./Loc. protocol, and MQuAKE's generated answers."""

from __future__ import annotations

from overtone.benchmarks import MQUAKE_GENERATION, TEACHER_FORCED
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
from overtone.models.loading import LoadedModel


def make_evaluator(evaluation: str, lm: LoadedModel, generation: GenerationSettings | None = None) -> Evaluator:
    """The evaluator a benchmark asks for (``Benchmark.evaluation``)."""
    if evaluation == TEACHER_FORCED:
        return Evaluator(lm)
    if evaluation == MQUAKE_GENERATION:
        return MQuAKEEvaluator(lm, generation)
    raise ValueError(f"unknown evaluation {evaluation!r}; known: {TEACHER_FORCED}, {MQUAKE_GENERATION}")


__all__ = [
    "METRICS",
    "AnswerLogits",
    "CaseScores",
    "Evaluator",
    "GenerationSettings",
    "MQuAKEEvaluator",
    "PreEdit",
    "Predictions",
    "ProbeBatch",
    "make_evaluator",
]
