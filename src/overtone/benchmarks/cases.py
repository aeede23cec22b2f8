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
    to its probes. ``raw`` keeps the source record for formats that carry more.

    A case may bundle several facts that are edited one after the other and measured together
    (an MQuAKE record: four rewrites, then questions that chain them). Then ``edits`` holds those
    facts in order, and ``prompt``/``target`` state the question they jointly change and its new answer.
    Runners hand editors the ``requests``, never the bundle itself.
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
    edits: tuple[EditCase, ...] = ()

    @property
    def requests(self) -> tuple[EditCase, ...]:
        """The facts an editor applies for this case, in order: ``edits``, or the case itself."""
        return self.edits or (self,)

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ValueError(f"case {self.case_id}: empty prompt")
        if not self.target.strip():
            raise ValueError(f"case {self.case_id}: empty target")
