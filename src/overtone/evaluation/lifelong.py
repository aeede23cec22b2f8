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

All rows of all cases go through the model together (``score_rows``), in batches of rows of similar
length, each row once however many probes share it (a comparison's better answer is usually a KnowEdit
probe too), and the vocabulary head only at the positions scored. A row whose answer is one token and
whose prompt's tokens begin another row (CounterFact's old target beside its new one on the same prompt)
is read from that row's prediction at that position: a causal model gives a position the same
prediction whatever follows it. ``evaluate_together`` evaluates a stream's cases this way with the
teacher-forced KnowEdit metrics and the comparisons in the same pass. On the unedited model that pass goes
through the evaluation cache (``evaluation.cache``) as one entry for the whole call, keyed by a hash of every
row: the CE and OverTone streams of a slice, and a stream's restarts, score the unedited model once. A row's
floating-point result can depend on the rows batched with it, so only the very same set of rows is read back.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from overtone.benchmarks.cases import EditCase
from overtone.cachedir import canonical
from overtone.evaluation.cache import EvalCache, through
from overtone.evaluation.generation import generate_ids
from overtone.evaluation.teacher_forced import Evaluator, Predictions, PreEdit, answer_entropy, flatness_of
from overtone.models.loading import LoadedModel
from overtone.models.replay import forward_hidden
from overtone.tokens import PairBatch, concat_pairs, encode_pairs, plan_batches

LIFELONG_METRICS = ("efficacy", "generalization", "specificity", "fluency")
ROW_BATCH_TOKENS = 8192  # padded tokens per forward pass of the scored rows
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

    ``fluency_tokens`` new tokens are generated per rewrite prompt for the fluency (0: no fluency), for every
    ``fluency_every``-th case of a call (the first, the K+1-th, ...; the others' fluency is None).
    """

    def __init__(self, lm: LoadedModel, fluency_tokens: int = 32, fluency_every: int = 1) -> None:
        if fluency_every < 1:
            raise ValueError(f"fluency_every must be >= 1, got {fluency_every}")
        self.lm = lm
        self.fluency_tokens = fluency_tokens
        self.fluency_every = fluency_every

    def logprobs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Mean log-probability per answer token of each (prompt, answer), teacher-forced."""
        rows = [encode_pairs(self.lm.tokenizer, [p], [a], self.lm.device) for p, a in pairs]
        return [score.logprob for score in score_rows(self.lm, rows)]

    def continuations(self, prompts: Sequence[str]) -> list[str]:
        """The greedy continuation of each prompt, ``fluency_tokens`` long; prompts of similar length share a
        generate call (a row's reply does not depend on the others in its batch)."""
        lengths = [len(self.lm.tokenizer(p).input_ids) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
        texts = [""] * len(prompts)
        for first in range(0, len(order), GENERATION_BATCH):
            group = order[first: first + GENERATION_BATCH]
            ids = generate_ids(self.lm, [prompts[i] for i in group], self.fluency_tokens)
            for i, text in zip(group, self.lm.tokenizer.batch_decode(ids, skip_special_tokens=True), strict=True):
                texts[i] = text
        return texts

    def score(self, cases: Sequence[EditCase], fluency_of: bool = True) -> list[dict[str, float | None]]:
        """Per case, the lifelong metrics in [0, 1] (fluency in bits); ``fluency_of`` False leaves fluency out."""
        per_case = [comparisons(case) for case in cases]
        flat = [c for cs in per_case for c in cs]
        return self.judge(cases, per_case, self.logprobs([(c.prompt, a) for c in flat for a in (c.better, c.worse)]),
                          fluency_of)

    def judge(self, cases: Sequence[EditCase], per_case: Sequence[Sequence[Comparison]], scores: Sequence[float],
              fluency_of: bool) -> list[dict[str, float | None]]:
        """The metrics of ``cases`` from the scores of their comparisons' rows (better, worse; in order), and
        their fluency when ``fluency_of``."""
        results: list[dict[str, float | None]] = []
        at = 0
        for cs in per_case:
            results.append(judged([(c.metric, scores[at + 2 * k] > scores[at + 2 * k + 1]) for k, c in enumerate(cs)]))
            at += 2 * len(cs)
        if fluency_of and self.fluency_tokens:
            chosen = range(0, len(cases), self.fluency_every)
            for i, text in zip(chosen, self.continuations([cases[i].prompt for i in chosen]), strict=True):
                results[i]["fluency"] = fluency(text)
        return results


class CaseRowsError(ValueError):
    """A case's probes or comparisons cannot be tokenised for scoring; ``case_id`` names it."""

    def __init__(self, case_id: str, cause: ValueError) -> None:
        super().__init__(str(cause))
        self.case_id = case_id


@dataclass(frozen=True)
class RowScore:
    """What the model predicts on one scored row: at each answer position the argmax and the entropy (nats) of
    the prediction, and the mean log-probability of the answer's tokens."""

    tokens: torch.Tensor
    entropy: torch.Tensor
    logprob: float


@torch.no_grad()
def score_rows(lm: LoadedModel, rows: Sequence[PairBatch]) -> list[RowScore]:
    """Each row (a one-row ``PairBatch``) scored on the model as it is: every distinct row once, a one-token
    answer whose context begins another row read from that row (module docstring), the others in batches of
    similar length (at most ``ROW_BATCH_TOKENS`` padded tokens), the head only at the answer positions."""
    keys = [(tuple(row.input_ids[0].tolist()), tuple(row.positions[0].tolist())) for row in rows]
    distinct: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    for i, key in enumerate(keys):
        distinct.setdefault(key, i)
    hosts: dict[tuple[int, ...], tuple[int, int]] = {}  # a context's tokens -> (computed row, its answer position)
    riders: dict[int, list[tuple[int, int, int]]] = {}  # computed row -> (answer position, token, riding row)
    computed = []
    for i in sorted(distinct.values(), key=lambda i: (len(keys[i][1]) == 1, i)):  # longer answers host first
        ids, positions = keys[i]
        host = hosts.get(ids[: positions[0] + 1]) if len(positions) == 1 else None
        if host is not None:
            riders.setdefault(host[0], []).append((host[1], int(rows[i].labels[0, 0]), i))
            continue
        computed.append(i)
        for j, position in enumerate(positions):
            hosts.setdefault(ids[: position + 1], (i, j))
    scores: dict[int, RowScore] = {}
    tokenizer, adapter = lm.tokenizer, lm.adapter
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for group in plan_batches([rows[i].input_ids[0] for i in computed], ROW_BATCH_TOKENS):
        members = [computed[k] for k in group]
        batch = concat_pairs([rows[i] for i in members], pad)
        hidden, _ = forward_hidden(adapter, batch.input_ids, batch.attention_mask, None)
        mask = batch.label_mask
        logits = adapter.logits(batch.gather(hidden)[mask])
        logp = torch.log_softmax(logits.float(), dim=-1)
        predicted, entropy = logits.argmax(dim=-1), answer_entropy(logits)
        picked = logp.gather(-1, batch.labels[mask][:, None]).squeeze(-1)
        at = 0
        for i, count in zip(members, mask.sum(dim=-1).tolist(), strict=True):
            span = slice(at, at + count)
            scores[i] = RowScore(predicted[span], entropy[span], picked[span].mean().item())
            for j, token, rider in riders.get(i, ()):
                scores[rider] = RowScore(predicted[at + j: at + j + 1], entropy[at + j: at + j + 1],
                                         logp[at + j, token].item())
            at += count
    return [scores[distinct[key]] for key in keys]


def unedited_rows(cache: EvalCache | None, lm: LoadedModel, rows: Sequence[PairBatch]) -> tuple[list[RowScore], bool]:
    """``score_rows`` on the unedited model, read from ``cache`` when it holds this very list of rows (keyed by a
    sha256 of each row's tokens, answer positions and labels, in order), and whether it was."""

    def probes() -> dict[str, Any]:
        digest = hashlib.sha256()
        for row in rows:
            digest.update(canonical([row.input_ids[0].tolist(), row.positions[0].tolist(),
                                     row.labels[0].tolist()]).encode())
            digest.update(b"\n")
        return {"rows": len(rows), "sha256": digest.hexdigest()}

    def encode(scores: list[RowScore]) -> list[Any]:
        return [[s.tokens.tolist(), s.entropy.tolist(), s.logprob] for s in scores]

    def decode(stored: list[Any]) -> list[RowScore]:
        return [RowScore(torch.tensor(tokens, dtype=torch.long, device=lm.device),
                         torch.tensor(entropy, dtype=torch.float32, device=lm.device), float(logprob))
                for tokens, entropy, logprob in stored]

    def check(stored: Any) -> bool:
        return (isinstance(stored, list) and len(stored) == len(rows)
                and all(isinstance(s, list) and len(s) == 3 and len(s[0]) == len(s[1]) == int(row.labels.numel())
                        for s, row in zip(stored, rows, strict=False)))

    return through(cache, "lifelong-rows", {"row_batch_tokens": ROW_BATCH_TOKENS}, probes,
                   lambda: score_rows(lm, rows), encode, decode, check)


def evaluate_together(evaluator: Evaluator, scorer: LifelongScorer, cases: Sequence[EditCase],
                      pres: Sequence[PreEdit] | None = None, fluency_of: bool = True
                      ) -> tuple[list[Any], list[dict[str, float | None]]]:
    """The teacher-forced evaluation of ``cases`` and their lifelong metrics in one pass (``score_rows``).

    Without ``pres`` (the unedited model): each case's ``PreEdit`` (as ``evaluator.before`` makes it, without
    recorded activations) and its comparisons; with them (the edited model): each case's result fields (as
    ``evaluator.after``) and its comparisons, with fluency when ``fluency_of``. The records equal those of
    ``before_many`` / ``after_many`` and ``scorer.score`` (tests/test_stream.py).
    """
    start = time.perf_counter()
    lm = scorer.lm
    probes, per_case, rows, compared = [], [], [], []
    for i, case in enumerate(cases):
        try:
            probe = pres[i].probes if pres is not None else evaluator.probes(case)
            per_case.append(comparisons(case))
            compared += [encode_pairs(lm.tokenizer, [c.prompt], [a], lm.device) for c in per_case[-1]
                         for a in (c.better, c.worse)]
        except ValueError as exc:
            raise CaseRowsError(case.case_id, exc) from exc
        probes.append(probe)
        rows += [probe.batch.row(r) for r in range(probe.batch.input_ids.size(0))]
    if pres is None:
        scores, hit = unedited_rows(evaluator.eval_cache, lm, rows + compared)
    else:
        scores, hit = score_rows(lm, rows + compared), False
    seconds = (time.perf_counter() - start) / max(len(cases), 1)
    vocabulary = lm.adapter.lm_head.weight.size(0)
    at, out = 0, []
    for i, probe in enumerate(probes):
        own = scores[at: at + len(probe.groups)]
        at += len(own)
        predictions = Predictions([s.tokens for s in own])
        if pres is None:
            out.append(PreEdit(probe, predictions, seconds, len(own) if hit else 0))
            continue
        rewrites = torch.cat([s.entropy for s, (metric, _) in zip(own, probe.groups, strict=True) if metric == "rel"])
        out.append(evaluator.scored(pres[i], predictions, flatness_of(rewrites, vocabulary),
                                    pres[i].seconds + seconds))
    lifelong = scorer.judge(cases, per_case, [s.logprob for s in scores[at:]], fluency_of and pres is not None)
    return out, lifelong


def lifelong_means(scores: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """Means over cases (x100, fluency in bits as it is); None where no case has the metric."""
    out: dict[str, float | None] = {}
    for metric in LIFELONG_METRICS:
        values = [s[metric] for s in scores if s.get(metric) is not None]
        mean = sum(values) / len(values) if values else None  # type: ignore[arg-type]
        out[metric] = None if mean is None else round(mean if metric == "fluency" else 100 * mean, 2)
    return out
