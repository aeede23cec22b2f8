"""The base class of the locate-then-edit editors (ROME, MEMIT): what they check before any model work."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import Editor
from overtone.editors.locate.subject import encode_rows


class LocateEditor(Editor):
    """An editor that writes a fact at its subject's last token, so the subject must be found in the prompt."""

    @classmethod
    def check_request(cls, config: Any, tokenizer: PreTrainedTokenizerBase, request: EditCase) -> None:
        """Raise ``SubjectError`` naming the case when its subject is not in its prompt (unless ``missing_subject``
        says what to use instead) or when the subject's last token is also the target's first."""
        encode_rows(tokenizer, request, [""], with_answer=True, missing=config.missing_subject)
