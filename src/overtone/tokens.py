"""Tokenising ``prompt + " " + answer`` pairs and locating the answer's tokens.

Editing and teacher-forced evaluation both work on the text ``f"{prompt} {answer}"`` (the reference
toolkit's convention) and score the answer's tokens, each predicted from the position before it. The
answer's tokens are found from the fast tokenizer's character offsets: a token belongs to the answer
if it covers any character after the prompt. This tokenises the joint text once, as the model sees
it, and avoids the off-by-one the reference toolkit gets when the prompt's separate tokenisation
differs from its tokenisation inside the joint text.

Batches are right-padded: every real token keeps its unpadded position, so a sequence gives the
same logits alone or in a batch. ``plan_batches`` groups sequences of similar length, so that padding
stays small; the evaluation and the second-moment statistics batch their sequences with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from overtone.objectives import IGNORE_INDEX


@dataclass
class PairBatch:
    """A right-padded batch of prompt+answer sequences and where their answer tokens are."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [B, T] index of the hidden state that predicts each answer token (0-padded)
    labels: torch.Tensor  # [B, T] answer token ids, IGNORE_INDEX where padded

    @property
    def label_mask(self) -> torch.Tensor:
        return self.labels.ne(IGNORE_INDEX)

    def gather(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, H] at the answer-predicting positions of ``hidden`` [B, L, H]."""
        rows = torch.arange(hidden.size(0), device=hidden.device)[:, None]
        return hidden[rows, self.positions]

    def row(self, index: int) -> PairBatch:
        """Row ``index`` alone, without the batch's padding."""
        length = int(self.attention_mask[index].sum())
        width = int(self.label_mask[index].sum())
        return PairBatch(self.input_ids[index: index + 1, :length], self.attention_mask[index: index + 1, :length],
                         self.positions[index: index + 1, :width], self.labels[index: index + 1, :width])

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.positions,
                                                  self.labels)))


def concat_pairs(batches: Sequence[PairBatch], pad_id: int) -> PairBatch:
    """The rows of ``batches`` in one right-padded batch, in order (a row's logits do not depend on padding)."""
    length = max(b.input_ids.size(1) for b in batches)
    width = max(b.labels.size(1) for b in batches)

    def padded(t: torch.Tensor, size: int, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, size - t.size(1)), value=value)

    return PairBatch(torch.cat([padded(b.input_ids, length, pad_id) for b in batches]),
                     torch.cat([padded(b.attention_mask, length, 0) for b in batches]),
                     torch.cat([padded(b.positions, width, 0) for b in batches]),
                     torch.cat([padded(b.labels, width, IGNORE_INDEX) for b in batches]))


def answer_token_indices(offsets: Sequence[tuple[int, int]], cut: int) -> list[int]:
    """Indices of the tokens that cover any character at or after ``cut`` (the answer of ``prompt + " " + answer``).

    Token 0 is never an answer token: nothing precedes it to predict it.
    """
    return [j for j, (_start, end) in enumerate(offsets) if end > cut and j > 0]


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    device: torch.device | str = "cpu",
) -> PairBatch:
    """Tokenise each ``f"{prompt} {answer}"`` and mark the answer's tokens."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    rows: list[list[int]] = []
    answer_spans: list[list[int]] = []
    for prompt, answer in zip(prompts, answers, strict=True):
        if not answer.strip():
            raise ValueError(f"empty answer for prompt {prompt!r}")
        enc = tokenizer(f"{prompt} {answer}", return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        span = answer_token_indices(offsets, len(prompt))
        if not span:
            raise ValueError(f"no answer tokens found for prompt {prompt!r} and answer {answer!r}")
        rows.append(ids)
        answer_spans.append(span)
    length = max(len(r) for r in rows)
    width = max(len(s) for s in answer_spans)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, span) in enumerate(zip(rows, answer_spans, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        positions[i, : len(span)] = torch.tensor(span) - 1
        labels[i, : len(span)] = torch.tensor([ids[j] for j in span])
    return PairBatch(input_ids, attention, positions, labels).to(torch.device(device))


def plan_batches(samples: Sequence[Sequence[int]], batch_tokens: int) -> list[list[int]]:
    """Sample indices grouped into batches of similar length, each at most ``batch_tokens`` padded tokens."""
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i]), i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * len(samples[batches[-1][0]]) <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches
