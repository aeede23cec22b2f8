"""The metrics of the lifelong-editing papers (ROME, MEMIT, AlphaEdit), beside the KnowEdit token accuracies.

For a case with an old target (``EditCase.ground_truth``: CounterFact's true object), every comparison is
between two answers to the same prompt, each scored teacher-forced as the mean log-probability per answer
token of ``f"{prompt} {answer}"`` (the answer's tokens as the KnowEdit evaluation marks them):

* ``efficacy``: 1 when the rewrite prompt gives the new target a higher score than the old one, else 0;
* ``generalization``: the same on each rephrase of the case, averaged over its rephrases;
* ``specificity``: on each locality prompt with an answer (CounterFact's neighbourhood prompt, whose
  answer is the true object), 1 when that answer scores higher than the new target; averaged;
* ``fluency``: the weighted bi- and trigram entropy (bits) of the greedy continuation of the rewrite
  prompt, ``(2/3 H2 + 4/3 H3) / 2`` as ROME's ``n_gram_entropy``; words are ``\\w+`` runs and single
  other non-space characters (ROME tokenises with NLTK's ``word_tokenize``; the two agree on plain words
  and punctuation, not on contractions).

A metric without its probes (no old target, no rephrase, no locality answer) is None for that case.
All rows of all cases go through the model together, in batches of rows of similar length.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from overtone.benchmarks.cases import EditCase
from overtone.evaluation.generation import generate_ids
from overtone.models.loading import LoadedModel
from overtone.models.replay import forward_hidden
from overtone.tokens import concat_pairs, encode_pairs, plan_batches

LIFELONG_METRICS = ("efficacy", "generalization", "specificity", "fluency")
ROW_BATCH_TOKENS = 4096  # padded tokens per forward pass of the comparisons
GENERATION_BATCH = 64  # prompts per generate call of the fluency continuations
NGRAM_WEIGHTS = {2: 2 / 3, 3: 4 / 3}  # ROME's n_gram_entropy
WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, n: int) -> float:
    """Entropy in bits of the frequency distribution of the word n-grams of ``text`` (0 without any)."""
    words = WORD.findall(text)
    counts = Counter(tuple(words[i: i + n]) for i in range(len(words) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def fluency(text: str) -> float:
    """ROME's weighted n-gram entropy of one text: the mean of 2/3 x bigram and 4/3 x trigram entropy."""
    return sum(w * ngram_entropy(text, n) for n, w in NGRAM_WEIGHTS.items()) / len(NGRAM_WEIGHTS)


@dataclass(frozen=True)
class Comparison:
    """A case's probe where ``better`` should score above ``worse`` after the edit; ``metric`` names it."""

    metric: str
    prompt: str
    better: str
    worse: str


def comparisons(case: EditCase) -> list[Comparison]:
    """The probability comparisons of ``case`` (see the module docstring); none without an old target."""
    old = case.ground_truth
    out = []
    if old and old.strip() and old.strip() != case.target.strip():
        out.append(Comparison("efficacy", case.prompt, case.target, old))
        out += [Comparison("generalization", text, case.target, old) for text in case.rephrases]
    for probes in case.locality.values():
        out += [Comparison("specificity", p.prompt, p.answer, case.target) for p in probes
                if p.answer and p.answer.strip() and p.answer.strip() != case.target.strip()]
    return out


def judged(results: Sequence[tuple[str, bool]]) -> dict[str, float | None]:
    """Per metric, the fraction of its comparisons that came out right (None: the case has none)."""
    by: dict[str, list[bool]] = {}
    for metric, right in results:
        by.setdefault(metric, []).append(right)
    return {m: (sum(by[m]) / len(by[m]) if m in by else None) for m in LIFELONG_METRICS if m != "fluency"}


class LifelongScorer:
    """The lifelong metrics of cases on the model as it is now, batched across cases.

    ``fluency_tokens`` new tokens are generated per rewrite prompt for the fluency (0: no fluency).
    """

    def __init__(self, lm: LoadedModel, fluency_tokens: int = 32) -> None:
        self.lm = lm
        self.fluency_tokens = fluency_tokens

    def describe(self) -> dict[str, Any]:
        return {"lifelong_metrics": list(LIFELONG_METRICS), "fluency_tokens": self.fluency_tokens}

    @torch.no_grad()
    def logprobs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Mean log-probability per answer token of each (prompt, answer), teacher-forced."""
        tokenizer = self.lm.tokenizer
        rows = [encode_pairs(tokenizer, [p], [a], self.lm.device) for p, a in pairs]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        out = [0.0] * len(rows)
        adapter = self.lm.adapter
        for batch_rows in plan_batches([r.input_ids[0] for r in rows], ROW_BATCH_TOKENS):
            batch = concat_pairs([rows[i] for i in batch_rows], pad)
            hidden, _ = forward_hidden(adapter, batch.input_ids, batch.attention_mask, None)
            mask = batch.label_mask
            logits = adapter.logits(batch.gather(hidden)[mask]).float()
            picked = torch.log_softmax(logits, dim=-1).gather(-1, batch.labels[mask][:, None]).squeeze(-1)
            for i, row in zip(batch_rows, picked.split(mask.sum(dim=-1).tolist()), strict=True):
                out[i] = row.mean().item()
        return out

    def continuations(self, prompts: Sequence[str]) -> list[str]:
        """The greedy continuation of each prompt, ``fluency_tokens`` long (rows do not affect each other)."""
        texts = []
        for first in range(0, len(prompts), GENERATION_BATCH):
            ids = generate_ids(self.lm, prompts[first: first + GENERATION_BATCH], self.fluency_tokens)
            texts += self.lm.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return texts

    def score(self, cases: Sequence[EditCase], fluency_of: bool = True) -> list[dict[str, float | None]]:
        """Per case, the lifelong metrics in [0, 1] (fluency in bits); ``fluency_of`` False leaves fluency out."""
        per_case = [comparisons(case) for case in cases]
        flat = [c for cs in per_case for c in cs]
        scores = self.logprobs([(c.prompt, a) for c in flat for a in (c.better, c.worse)])
        results: list[dict[str, float | None]] = []
        at = 0
        for cs in per_case:
            results.append(judged([(c.metric, scores[at + 2 * k] > scores[at + 2 * k + 1]) for k, c in enumerate(cs)]))
            at += 2 * len(cs)
        if fluency_of and self.fluency_tokens:
            for result, text in zip(results, self.continuations([c.prompt for c in cases]), strict=True):
                result["fluency"] = fluency(text)
        return results


def lifelong_means(scores: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """Means over cases (x100, fluency in bits as it is); None where no case has the metric."""
    out: dict[str, float | None] = {}
    for metric in LIFELONG_METRICS:
        values = [s[metric] for s in scores if s.get(metric) is not None]
        mean = sum(values) / len(values) if values else None  # type: ignore[arg-type]
        out[metric] = None if mean is None else round(mean if metric == "fluency" else 100 * mean, 2)
    return out
