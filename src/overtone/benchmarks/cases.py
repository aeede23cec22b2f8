"""Typed edit cases: what every benchmark loader produces and every editor and evaluator consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Probe:
    """A teacher-forced question: ``prompt + " " + answer`` is scored on the answer's tokens."""

    prompt: str
    answer: str
    aliases: tuple[str, ...] = ()  # other accepted answers, kept for generation-based evaluation


@dataclass(frozen=True)
class EditCase:
    """One fact to edit, with the probes that measure the edit.

    ``portability`` and ``locality`` map a probe kind (e.g. ``Reasoning``, ``Relation_Specificity``)
    to its probes. ``raw`` keeps the source record for formats that carry more (e.g. MQuAKE hops).
    """

    case_id: str
    prompt: str
    target: str
    subject: str | None = None
    ground_truth: str | None = None  # the old answer, where the dataset has one
    rephrases: tuple[str, ...] = ()
    portability: dict[str, tuple[Probe, ...]] = field(default_factory=dict)
    locality: dict[str, tuple[Probe, ...]] = field(default_factory=dict)
    raw: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ValueError(f"case {self.case_id}: empty prompt")
        if not self.target.strip():
            raise ValueError(f"case {self.case_id}: empty target")
