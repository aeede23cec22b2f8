"""The field's teacher-forced evaluation (the reference toolkit's protocol, see docs/protocol.md).

* Rel., Gen., Por.: token accuracy of the argmax prediction on ``prompt + " " + answer`` over the
  answer's tokens (partial credit), for the edit prompt, its rephrases and the portability probes.
* Loc.: fraction of a locality probe's answer positions where the edited model's argmax equals the
  unedited model's; agreement, not correctness. A locality probe without an answer (hand-written
  facts) is scored on the unedited model's own greedy continuation.
* Per case, portability and locality average over the probes of a kind, then over kinds.
* A case that bundles several edits (``EditCase.edits``) has one Rel. probe per edit, averaged.

All probes of a case go through the model in one right-padded batch. The unedited pass records the
inputs of the layers an editor may touch, so the edited pass only runs those layers again. With an
``EvalCache`` (``eval_cache``), the unedited predictions of a batch already computed (by this or another run)
are read instead; nothing is recorded then, and the edited pass runs the whole model (the same logits).

Parallel editing (``Editor.edit_parallel``) evaluates its B cases together: ``before_cases`` runs the
probes of all B cases through the unedited model, sorted by length into batches of similar rows (so
little is padding), and ``after_cases`` runs the same batches again with ``CaseEdits.applied``, so
each row sees the edit of its own case only. An evaluator that cannot batch B edited models (MQuAKE's
samples per case) evaluates them one at a time (``before_each``, ``after_each``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from transformers import PreTrainedTokenizerBase

from overtone.benchmarks.cases import EditCase
from overtone.evaluation.cache import EvalCache, through
from overtone.generation import greedy_complete
from overtone.models.loading import LoadedModel
from overtone.models.per_case import CaseRows
from overtone.models.replay import SuffixCache, forward_hidden, forward_suffix
from overtone.tokens import PairBatch, concat_pairs, encode_pairs, plan_batches

if TYPE_CHECKING:
    from overtone.editors.parallel import CaseEdits, ModelShape

METRICS = ("rel", "gen", "por", "loc")
OWN_ANSWER_TOKENS = 8  # tokens of the unedited model's continuation that a prompt-only locality probe scores


@dataclass
class ProbeBatch:
    """All probes of one case, tokenised; ``groups[i]`` = (metric, kind) of row i."""

    case: EditCase
    groups: list[tuple[str, str]]
    batch: PairBatch
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (prompt, answer) of row i


@dataclass
class Predictions:
    """Argmax token ids at every scored position of a ``ProbeBatch``, per row."""

    tokens: list[torch.Tensor]  # row i: [n_i] predicted ids
    cache: SuffixCache | None = None  # inputs of the upper layers, for a cheaper edited pass


@dataclass
class AnswerLogits:
    """Logits at every scored answer position of a ``ProbeBatch``, the rows' positions concatenated."""

    logits: torch.Tensor  # [N, V], N = sum(counts)
    counts: list[int]  # answer tokens of each row
    cache: SuffixCache | None = None

    def rows(self) -> list[torch.Tensor]:
        return list(self.logits.split(self.counts))


@dataclass
class CaseScores:
    """Metrics of one case in [0, 1]; None where the case has no probe of that metric."""

    rel: float | None
    gen: float | None
    por: float | None
    loc: float | None
    detail: dict[str, dict[str, float]]  # metric -> kind -> mean over that kind's probes

    def as_dict(self) -> dict[str, float | None]:
        return {m: getattr(self, m) for m in METRICS}


@dataclass
class PreEdit:
    """A case evaluated on the unedited model, waiting for its evaluation after the edit."""

    probes: ProbeBatch
    predictions: Predictions  # the locality reference; its cache lets the edited pass skip lower layers
    seconds: float
    hits: int = 0  # rows whose predictions came from the evaluation cache

    @property
    def cache(self) -> SuffixCache | None:
        """Recorded inputs of the upper layers, valid for the edited pass while no lower layer changed."""
        return self.predictions.cache


# Padded tokens per batch when the probes of several cases are evaluated together.
CASES_BATCH_TOKENS = 2048


@dataclass
class ProbeRows:
    """A batch of probe rows of several cases: row r is probe ``probe[r]`` of case ``rows.owners[r]``."""

    batch: PairBatch
    rows: CaseRows
    probe: list[int]
    cache: SuffixCache | None = None


@dataclass
class PreEdits:
    """Cases evaluated on the unedited model, waiting for their evaluation after a parallel edit."""

    cases: list[Any]  # per case (a ``PreEdit``, or an evaluator's own); without a cache of their own
    batches: list[ProbeRows]  # every probe of every case, in batches of rows of similar length (empty: none)

    def replayable(self, first_layer: int) -> bool:
        """Whether the recorded inputs stay valid for edits that change layers ``first_layer`` and up only."""
        return bool(self.batches) and all(b.cache is not None and first_layer >= b.cache.start
                                           for b in self.batches)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def by_metric(
    groups: list[tuple[str, str]], values: list[float | None]
) -> tuple[dict[str, float | None], dict[str, dict[str, float]]]:
    """Per-metric means of per-row ``values`` (None rows skipped): over a kind's probes, then over kinds."""
    per_kind: dict[str, dict[str, list[float]]] = {}
    for (metric, kind), value in zip(groups, values, strict=True):
        if value is not None:
            per_kind.setdefault(metric, {}).setdefault(kind, []).append(value)
    detail = {m: {k: sum(v) / len(v) for k, v in kinds.items()} for m, kinds in per_kind.items()}
    return {m: _mean(list(detail.get(m, {}).values())) for m in METRICS}, detail


def answer_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the prediction at each row of ``logits`` [N, V], computed in float32."""
    logits = logits.float()
    return -(torch.softmax(logits, dim=-1) * torch.log_softmax(logits, dim=-1)).sum(dim=-1)


def flatness_of(entropies: torch.Tensor, vocabulary: int) -> float:
    """The mean of ``entropies`` as a fraction of ln |V|: ``Evaluator.flatness`` from the rewrites' entropies."""
    return (entropies.mean() / math.log(vocabulary)).item()


def probe_pairs(case: EditCase, own_answer: Callable[[str], str] | None = None
                ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(metric, kind) and (prompt, answer) of each probe of ``case``: rewrites, rephrases, portability, locality.

    A locality probe without an answer gets ``own_answer(prompt)``, the unedited model's continuation
    (dropped when that is empty); without ``own_answer`` (a check before any model exists) it is left out.
    """
    groups: list[tuple[str, str]] = [("rel", "rewrite")] * len(case.requests)
    pairs = [(edit.prompt, edit.target) for edit in case.requests]
    for text in case.rephrases:
        groups.append(("gen", "rephrase"))
        pairs.append((text, case.target))
    for metric, probe_groups in (("por", case.portability), ("loc", case.locality)):
        for kind, probes in probe_groups.items():
            for probe in probes:
                answer = probe.answer
                if not answer and metric == "loc":
                    answer = own_answer(probe.prompt) if own_answer is not None else ""
                    if not answer:
                        continue
                groups.append((metric, kind))
                pairs.append((probe.prompt, answer))
    return groups, pairs


def check_probes(tokenizer: PreTrainedTokenizerBase, case: EditCase) -> None:
    """Raise ``ValueError`` naming the case if a probe cannot be scored (e.g. an answer with no tokens)."""
    _, pairs = probe_pairs(case)
    try:
        encode_pairs(tokenizer, [p for p, _ in pairs], [a for _, a in pairs])
    except ValueError as exc:
        raise ValueError(f"case {case.case_id}: {exc}") from exc


class Evaluator:
    """Teacher-forced Rel./Gen./Por./Loc. of edit cases on one model.

    The runners use ``before`` (on the unedited model) and ``after`` (on the edited one); ``probes``,
    ``predict`` and ``score`` are the steps in between, for callers that need them.
    """

    metrics: ClassVar[tuple[str, ...]] = METRICS  # the columns of this evaluation's tables, Avg. is their mean

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.eval_cache: EvalCache | None = None  # the unedited model's results, computed once (make_evaluator)

    def describe(self) -> dict[str, Any] | None:
        """Settings to write into a run's configuration (None: nothing beyond the model)."""
        return None

    def case_memory(self, shape: ModelShape) -> int:
        """Bytes that evaluating one edited case holds beyond the model (``CaseMemory.evaluation``). Teacher
        forcing keeps the logits of the answers' positions only: 22 to 46 MiB per window of one or two cases in
        the rehearsal at 7B widths (2 and 4 layers), a small share of any editor's training step, so 0 here."""
        return 0

    def before(self, case: EditCase, record_from: int | None) -> PreEdit:
        """Predictions of the unedited model, recording the inputs of layers >= ``record_from``."""
        start = time.perf_counter()
        probes = self.probes(case)
        tokens, cache, hits = self._unedited(probes.batch, probes.pairs, record_from)
        return PreEdit(probes, Predictions(tokens, cache), time.perf_counter() - start, hits)

    def after(self, pre: PreEdit, replay: bool) -> dict[str, Any]:
        """Result fields of the edited model: ``pre``, ``post``, ``detail`` metrics and ``eval_s``.

        ``replay`` says the edits left every layer below the recorded one unchanged, so the recorded
        inputs are still valid and only the upper layers run again.
        """
        start = time.perf_counter()
        cache = pre.predictions.cache if replay else None
        logits = self.answer_logits(pre.probes, replay=cache)
        post = Predictions(tokens=list(logits.logits.argmax(dim=-1).split(logits.counts)), cache=logits.cache)
        flatness = self.flatness(pre.probes, logits.rows())
        return self.scored(pre, post, flatness, pre.seconds + time.perf_counter() - start)

    def before_cases(self, cases: Sequence[EditCase], record_from: int | None) -> PreEdits:
        """``before`` for the cases of a parallel edit: their probes on the unedited model, in batches of rows
        of similar length (at most ``CASES_BATCH_TOKENS`` padded tokens each)."""
        start = time.perf_counter()
        probes = [self.probes(case) for case in cases]
        batches = self._probe_rows(probes)
        tokens: list[list[torch.Tensor | None]] = [[None] * p.batch.input_ids.size(0) for p in probes]
        hits = [0] * len(cases)
        for rows in batches:
            pairs = [probes[owner].pairs[probe] for owner, probe in zip(rows.rows.owners, rows.probe, strict=True)]
            predicted, rows.cache, hit = self._unedited(rows.batch, pairs, record_from)
            for owner, probe, row in zip(rows.rows.owners, rows.probe, predicted, strict=True):
                tokens[owner][probe] = row
                hits[owner] += bool(hit)
        seconds = (time.perf_counter() - start) / len(cases)
        return PreEdits([PreEdit(p, Predictions(t), seconds, h) for p, t, h in zip(probes, tokens, hits, strict=True)],
                        batches)

    def after_cases(self, pre: PreEdits, edits: CaseEdits, replay: bool) -> list[dict[str, Any]]:
        """``after`` for every case of a parallel edit, batched as ``before_cases`` batched them: each row sees
        the edit of its own case only (``CaseEdits.applied``). ``replay``: the recorded inputs are still valid."""
        start = time.perf_counter()
        logits: list[list[torch.Tensor | None]] = [[None] * len(p.predictions.tokens) for p in pre.cases]
        for rows in pre.batches:
            with edits.applied(rows.rows):
                out = self._answer_logits(rows.batch, replay=rows.cache if replay else None)
            for owner, probe, row in zip(rows.rows.owners, rows.probe, out.rows(), strict=True):
                logits[owner][probe] = row
        share = (time.perf_counter() - start) / len(pre.cases)
        return [self.scored(p, Predictions([row.argmax(dim=-1) for row in rows]), self.flatness(p.probes, rows),
                             p.seconds + share) for p, rows in zip(pre.cases, logits, strict=True)]

    def before_each(self, cases: Sequence[EditCase], record_from: int | None) -> PreEdits:
        """``before_cases`` of an evaluator that evaluates the cases of a parallel edit one at a time."""
        return PreEdits(list(self.before_many(cases, None)), [])

    def after_each(self, pre: PreEdits, edits: CaseEdits) -> list[dict[str, Any]]:
        """``after_cases`` one case at a time, each with its own edit on every row (``CaseEdits.only``): the
        evaluation of each case's edited model alone, whatever the evaluator does with it."""
        results = []
        for i, case_pre in enumerate(pre.cases):
            with edits.only(i):
                results += self.after_many([case_pre], [False])
        return results

    def _unedited(self, batch: PairBatch, pairs: Sequence[tuple[str, str]], record_from: int | None
                  ) -> tuple[list[torch.Tensor], SuffixCache | None, int]:
        """The unedited model's argmax predictions on ``batch`` (rows: ``pairs``) and the recorded inputs of layers
        >= ``record_from``; read from the evaluation cache when it holds this very batch (then nothing is
        recorded). The number of rows read from the cache is the third item."""
        counts = batch.label_mask.sum(dim=-1).tolist()

        def compute() -> tuple[list[torch.Tensor], SuffixCache | None]:
            out = self._answer_logits(batch, record_from=record_from)
            return list(out.logits.argmax(dim=-1).split(out.counts)), out.cache

        (tokens, recorded), hit = through(
            self.eval_cache, "teacher-forced", {},
            lambda: {"pairs": [list(p) for p in pairs], "input_ids": batch.input_ids.tolist(),
                     "attention_mask": batch.attention_mask.tolist(), "label_mask": batch.label_mask.tolist()},
            compute, lambda result: [t.tolist() for t in result[0]],
            lambda rows: ([torch.tensor(r, dtype=torch.long, device=batch.input_ids.device) for r in rows], None),
            lambda rows: [len(r) for r in rows] == counts and all(isinstance(t, int) for r in rows for t in r))
        return tokens, recorded, len(tokens) if hit else 0

    def _probe_rows(self, probes: Sequence[ProbeBatch]) -> list[ProbeRows]:
        """Every probe row of every case, in batches of rows of similar length."""
        entries = [(i, r) for i, p in enumerate(probes) for r in range(p.batch.input_ids.size(0))]
        rows = [probes[i].batch.row(r) for i, r in entries]
        pad = self.lm.tokenizer.pad_token_id if self.lm.tokenizer.pad_token_id is not None else 0
        out = []
        for batch in plan_batches([row.input_ids[0] for row in rows], CASES_BATCH_TOKENS):
            out.append(ProbeRows(concat_pairs([rows[k] for k in batch], pad),
                                 CaseRows(tuple(entries[k][0] for k in batch), len(probes)),
                                 [entries[k][1] for k in batch]))
        return out

    def scored(self, pre: PreEdit, post: Predictions, flatness: float, seconds: float) -> dict[str, Any]:
        """The result fields of a case from its predictions before and after the edit."""
        pre_scores = self.score(pre.probes, pre.predictions, reference=None)
        post_scores = self.score(pre.probes, post, reference=pre.predictions)
        return {
            "pre": {m: v for m, v in pre_scores.as_dict().items() if m != "loc"},
            "post": post_scores.as_dict(),
            "detail": post_scores.detail,
            "flatness": round(flatness, 4),
            "eval_s": seconds,
            **({"eval_cache_hits": pre.hits} if self.eval_cache is not None else {}),
        }

    def before_many(self, cases: Sequence[EditCase], record_from: int | None) -> list[PreEdit]:
        """``before`` for the cases of a chunk; an evaluator that batches across cases overrides it."""
        return [self.before(case, record_from) for case in cases]

    def after_many(self, pres: Sequence[PreEdit], replays: Sequence[bool]) -> list[dict[str, Any]]:
        """``after`` for cases evaluated on the same edited model; overridden to batch across cases."""
        return [self.after(pre, replay) for pre, replay in zip(pres, replays, strict=True)]

    @staticmethod
    def flatness(probes: ProbeBatch, logits: Sequence[torch.Tensor | None]) -> float:
        """Entropy of the predictions at the rewrites' answer tokens, as a fraction of ln |V| (1 = uniform).

        ``logits`` holds each probe row's answer logits (only the rewrites' are read). An edit that wrecked
        the model (e.g. a huge learning rate) leaves a flat distribution there.
        """
        rows = [row for (metric, _), row in zip(probes.groups, logits, strict=True) if metric == "rel"]
        rewrites = torch.cat([row for row in rows if row is not None])
        return flatness_of(answer_entropy(rewrites), rewrites.size(-1))

    def probes(self, case: EditCase) -> ProbeBatch:
        groups, pairs = probe_pairs(case, self.own_answer)
        try:
            batch = encode_pairs(self.lm.tokenizer, [p for p, _ in pairs], [a for _, a in pairs], self.lm.device)
        except ValueError as exc:
            raise ValueError(f"case {case.case_id}: {exc}") from exc
        return ProbeBatch(case=case, groups=groups, batch=batch, pairs=pairs)

    def own_answer(self, prompt: str) -> str:
        """The model's greedy continuation of ``prompt``: the answer of a locality probe that gives none.

        Loc. compares the edited model's predictions with the unedited one's, so a prompt alone is a
        probe: ``probes`` runs on the unedited model (``before``) and scores its own continuation.
        An empty continuation drops the probe. Read from the evaluation cache when it holds it.
        """
        answer, _ = through(
            self.eval_cache, "own-answer", {"max_new_tokens": OWN_ANSWER_TOKENS},
            lambda: {"prompt": prompt, "ids": self.lm.tokenizer(prompt).input_ids},
            lambda: greedy_complete(self.lm, [prompt], OWN_ANSWER_TOKENS)[0].strip(), str, str,
            lambda value: isinstance(value, str))
        return answer

    @torch.no_grad()
    def answer_logits(
        self, probes: ProbeBatch, record_from: int | None = None, replay: SuffixCache | None = None
    ) -> AnswerLogits:
        """Logits at the answer positions; ``record_from`` keeps a suffix cache, ``replay`` reuses one."""
        return self._answer_logits(probes.batch, record_from, replay)

    @torch.no_grad()
    def _answer_logits(self, batch: PairBatch, record_from: int | None = None,
                       replay: SuffixCache | None = None) -> AnswerLogits:
        adapter = self.lm.adapter
        if replay is not None:
            hidden, cache = forward_suffix(adapter, replay), replay
        else:
            hidden, cache = forward_hidden(adapter, batch.input_ids, batch.attention_mask, record_from)
        mask = batch.label_mask
        return AnswerLogits(adapter.logits(batch.gather(hidden)[mask]), mask.sum(dim=-1).tolist(), cache)

    def predict(
        self, probes: ProbeBatch, record_from: int | None = None, replay: SuffixCache | None = None
    ) -> Predictions:
        """Argmax predictions; ``record_from`` keeps a suffix cache, ``replay`` reuses one."""
        out = self.answer_logits(probes, record_from, replay)
        return Predictions(tokens=list(out.logits.argmax(dim=-1).split(out.counts)), cache=out.cache)

    def losses(self, probes: ProbeBatch, answer: AnswerLogits) -> dict[str, float | None]:
        """Per metric, the mean negative log-likelihood per answer token (nats) of the probes' answers.

        The paper's Fig. 1 loss ("the perplexity loss of the ground truth answer to a question"):
        the log-perplexity of each probe's answer given its prompt, averaged like the metrics (over a
        kind's probes, then over kinds). Locality uses the probe's own answer, as the dataset gives it.
        """
        labels = probes.batch.labels[probes.batch.label_mask]
        nll = -torch.log_softmax(answer.logits.float(), dim=-1).gather(-1, labels[:, None]).squeeze(-1)
        per_row = [row.mean().item() for row in nll.split(answer.counts)]
        return by_metric(probes.groups, per_row)[0]

    def score(self, probes: ProbeBatch, predicted: Predictions, reference: Predictions | None) -> CaseScores:
        """Metrics of ``predicted``; Loc. compares with ``reference`` (the unedited model's predictions)."""
        labels = probes.batch.labels
        per_row: list[float | None] = []
        for i, (metric, _kind) in enumerate(probes.groups):
            tokens = predicted.tokens[i]
            if metric == "loc":
                if reference is None:
                    per_row.append(None)
                    continue
                gold = reference.tokens[i]
            else:
                gold = labels[i, : tokens.numel()]
            per_row.append(tokens.eq(gold).float().mean().item())
        values, detail = by_metric(probes.groups, per_row)
        return CaseScores(**values, detail=detail)
