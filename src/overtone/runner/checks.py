"""Checks of a run's cases that need only the tokenizer, so that bad input fails in seconds, before any
model is loaded, statistics are computed or a case is evaluated."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import Editor
from overtone.evaluation.teacher_forced import check_probes


def prepare_cases(cases: Sequence[EditCase], tokenizer: PreTrainedTokenizerBase, editor: type[Editor],
                  config: Any, truncate: bool = False) -> list[EditCase]:
    """The cases as they will be edited and scored, or a ``ValueError`` naming the first bad case.

    Each case must suit the editor (``Editor.check_cases``: its length limit, ROME's and MEMIT's
    subject) and every probe must have answer tokens. ``truncate`` cuts over-long inputs instead of
    refusing them.
    """
    fitted = editor.check_cases(config, tokenizer, cases, truncate)
    for case in fitted:
        check_probes(tokenizer, case)
    return fitted
