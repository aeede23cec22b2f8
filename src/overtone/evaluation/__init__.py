"""Evaluation of edits: the teacher-forced Rel./Gen./Por./Loc. protocol."""

from overtone.evaluation.teacher_forced import (
    METRICS,
    AnswerLogits,
    CaseScores,
    Evaluator,
    Predictions,
    ProbeBatch,
)

__all__ = ["METRICS", "AnswerLogits", "CaseScores", "Evaluator", "Predictions", "ProbeBatch"]
