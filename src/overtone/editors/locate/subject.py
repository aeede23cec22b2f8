"""Where a fact is read: the subject's last token, and the token rows that ROME and MEMIT work on.

ROME and MEMIT write a fact into the MLP at the last token of its subject. That token is found from
the fast tokenizer's character offsets on the exact text the model sees, so a leading space, a
subject that ends inside a longer word ("Watt" in "Watts") or a subject split into byte pieces all
resolve to the token covering the subject's last character. The subject is searched in the prompt
exactly first, then ignoring case and runs of whitespace; its last occurrence counts, as the model
reads the fact at the mention right before the answer. A subject that is not in its prompt is an
error naming the case; ``missing="prompt_last"`` uses the prompt's last token instead (ROME's
``fact_token: last`` strategy).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from overtone.benchmarks.cases import EditCase
from overtone.objectives import IGNORE_INDEX
from overtone.tokens import answer_token_indices

MISSING_SUBJECT = ("error", "prompt_last")


class SubjectError(ValueError):
    """The subject of an edit case cannot be located in its prompt."""


def subject_span(text: str, subject: str) -> tuple[int, int] | None:
    """Character span [start, end) of the last occurrence of ``subject`` in ``text``, or None.

    Exact match first; then case-insensitive with any run of whitespace matching any other.
    """
    needle = subject.strip()
    if not needle:
        return None
    start = text.rfind(needle)
    if start >= 0:
        return start, start + len(needle)
    pattern = r"\s+".join(re.escape(part) for part in needle.split())
    matches = list(re.finditer(pattern, text, flags=re.IGNORECASE))
    return (matches[-1].start(), matches[-1].end()) if matches else None


def token_at(offsets: Sequence[tuple[int, int]], char: int) -> int:
    """Index of the last token whose character span covers ``char``.

    Offsets that leave out whitespace fall back to the last token starting at or before ``char``.
    """
    for j in range(len(offsets) - 1, -1, -1):
        start, end = offsets[j]
        if start <= char < end:
            return j
    for j in range(len(offsets) - 1, -1, -1):
        start, end = offsets[j]
        if end > start and start <= char:
            return j
    raise ValueError(f"no token covers character {char}")


@dataclass(frozen=True)
class LookupRow:
    """One tokenised text: where the subject's last token is and which tokens are the answer."""

    ids: tuple[int, ...]
    lookup: int  # index of the subject's last token
    answer: tuple[int, ...] = ()  # indices of the answer tokens (empty for a row without an answer)
    answer_ids: tuple[int, ...] = ()  # their token ids (kept when the row's last token is dropped)


def _check_missing(missing: str) -> None:
    if missing not in MISSING_SUBJECT:
        raise ValueError(f"missing_subject must be one of {', '.join(MISSING_SUBJECT)}, got {missing!r}")


def lookup_char(case: EditCase, missing: str) -> int:
    """Character index, within ``case.prompt``, of the subject's last character (see the module docstring)."""
    _check_missing(missing)
    span = subject_span(case.prompt, case.subject) if case.subject else None
    if span is not None:
        return span[1] - 1
    if missing == "prompt_last":
        return len(case.prompt.rstrip()) - 1
    what = f"subject {case.subject!r} does not occur in" if case.subject else "has no subject for"
    raise SubjectError(
        f"case {case.case_id}: {what} the prompt {case.prompt!r} (also ignoring case and spacing); "
        "set missing_subject='prompt_last' to read the fact at the prompt's last token instead"
    )


def encode_rows(
    tokenizer: PreTrainedTokenizerBase,
    case: EditCase,
    prefixes: Sequence[str],
    with_answer: bool,
    missing: str = "error",
) -> list[LookupRow]:
    """One row per context prefix: ``prefix + prompt`` (``+ " " + target`` when ``with_answer``)."""
    char = lookup_char(case, missing)
    rows = []
    for prefix in prefixes:
        prompt = prefix + case.prompt
        text = f"{prompt} {case.target}" if with_answer else prompt
        enc = tokenizer(text, return_offsets_mapping=True)
        lookup = token_at(enc["offset_mapping"], len(prefix) + char)
        answer = tuple(answer_token_indices(enc["offset_mapping"], len(prompt))) if with_answer else ()
        if with_answer and (not answer or answer[0] <= lookup):
            raise SubjectError(
                f"case {case.case_id}: the subject's last token is also the first token of the target "
                f"{case.target!r} in {text!r}; the edit cannot tell them apart"
            )
        ids = tuple(enc["input_ids"])
        rows.append(LookupRow(ids, lookup, answer, tuple(ids[j] for j in answer)))
    return rows


def encode_subject_row(tokenizer: PreTrainedTokenizerBase, case: EditCase, template: str) -> LookupRow:
    """``template.format(subject)`` (e.g. ROME's KL prompt "{} is a") with the subject's last token.

    A case without a subject uses its prompt instead, read at the prompt's last token.
    """
    if not case.subject or not case.subject.strip():
        return encode_rows(tokenizer, case, [""], with_answer=False, missing="prompt_last")[0]
    subject = case.subject.strip()
    before, _, _ = template.partition("{}")
    enc = tokenizer(template.format(subject), return_offsets_mapping=True)
    return LookupRow(tuple(enc["input_ids"]), token_at(enc["offset_mapping"], len(before) + len(subject) - 1))


def drop_last_token(row: LookupRow) -> LookupRow:
    """The row without its last token, which predicts nothing that is scored."""
    return LookupRow(row.ids[:-1], row.lookup, row.answer, row.answer_ids)


@dataclass
class AlignedRows:
    """Rows left-padded so that every lookup token sits in column ``cut``, then right-padded.

    ``positions``/``labels`` address the answer tokens relative to ``cut``: the hidden state at
    ``cut + positions[i, t]`` predicts ``labels[i, t]``.
    """

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T] each row's own positions 0..n-1 (0 on padding)
    cut: int
    positions: torch.Tensor  # [B, A]
    labels: torch.Tensor  # [B, A], IGNORE_INDEX where padded or where the row has no answer


def align_rows(rows: Sequence[LookupRow], pad_id: int, device: torch.device | str = "cpu") -> AlignedRows:
    cut = max(r.lookup for r in rows)
    length = max(cut - r.lookup + len(r.ids) for r in rows)
    width = max(1, max(len(r.answer) for r in rows))
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        shift = cut - row.lookup
        n = len(row.ids)
        input_ids[i, shift:shift + n] = torch.tensor(row.ids)
        mask[i, shift:shift + n] = 1
        position_ids[i, shift:shift + n] = torch.arange(n)
        for t, (j, token) in enumerate(zip(row.answer, row.answer_ids, strict=True)):
            positions[i, t] = shift + j - 1 - cut
            labels[i, t] = token
    return AlignedRows(input_ids.to(device), mask.to(device), position_ids.to(device), cut, positions.to(device),
                       labels.to(device))
