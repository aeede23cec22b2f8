"""Evaluation of edits: the teacher-forced Rel./Gen./Por./Loc. protocol."""

from overtone.evaluation.teacher_forced import METRICS, CaseScores, Evaluator, Predictions, ProbeBatch

__all__ = ["METRICS", "CaseScores", "Evaluator", "Predictions", "ProbeBatch"]
