"""Evaluation in the wild: the edited model generates each probe's answer itself (Yang et al., ACL 2025).

Teacher forcing feeds the model the target's own tokens and length; here nothing of the answer is given
(docs/wild.md has the rules, their sources and where they deviate):

* context: the bare probe prompt (``context="bare"``), or the study's QA instruction
  ``Please answer the question:\\n\\nQ: {question}\\nA:`` inside the model's chat template (``"qa"``);
* greedy decoding, at most 50 new tokens; a reply ends at end of sequence, at the first newline, or at
  the first sentence-final full stop: a "." followed by whitespace (or the end of the generation) whose
  word is not an initial ("U.S.", "J.") or a listed abbreviation ("St.", "Dr.", ...), so "St. Louis" and
  "3.5" are kept whole. The stop and the whitespace around the reply are removed. The study stops at any
  "."; each record counts the replies where that rule would have kept a different text;
* Rel., Gen., Por.: exact match of the reply with the target or one of its aliases after SQuAD-style
  normalisation (lower case, no punctuation, no articles a/an/the, single spaces); token F1 and
  "target contained" (the normalised answer occurs in the normalised reply as whole words) are kept too;
* Loc.: a probe is kept when its scored reply is the same before and after the edit: the normalised text
  up to the stop, the text the other metrics score. ``loc_tokens`` beside it: the share whose generated
  token ids are identical up to and including the token that holds the stop (or end of sequence), a
  stricter test that also sees what that token holds after the stop.

Per case, metrics average over the probes of a kind, then over kinds, as the teacher-forced ones. A
record keeps the teacher-forced ``pre``/``post`` (when that protocol runs too) and adds ``wild``.

All probes of a case, and of every case evaluated on the same model (a chunk of continual editing at
its end), are answered in left-padded batches; a row's reply does not depend on the other rows, so rows
of several cases share a batch: ``answer`` takes any list of prompts, and scoring only reads the replies.
The B edited models of a parallel edit share a batch too (``after_cases``): each row generates with its
own case's edit (``CaseEdits.applied``). The replies come from ``decoding.greedy_ids`` (rows leave the
batch when their reply is complete, a prompt prefix shared by every row is computed once per model
state), token for token those of transformers' greedy ``generate`` (``decoder="generate"``, kept to
compare with).
"""

from __future__ import annotations

import contextlib
import re
import string
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from overtone.benchmarks import TEACHER_FORCED
from overtone.benchmarks.cases import EditCase
from overtone.evaluation.cache import through
from overtone.evaluation.decoding import Scope, check_greedy, eos_ids, greedy_ids
from overtone.evaluation.generation import generate_ids
from overtone.evaluation.teacher_forced import METRICS, Evaluator, PreEdit, PreEdits, by_metric
from overtone.models.loading import LoadedModel
from overtone.models.per_case import CaseRows
from overtone.models.replay import SuffixCache

if TYPE_CHECKING:
    from overtone.editors.parallel import CaseEdits, ModelShape

WILD = "wild"
EVAL_MODES = {TEACHER_FORCED: (TEACHER_FORCED,), WILD: (WILD,), "both": (TEACHER_FORCED, WILD)}
CONTEXTS = ("bare", "qa")
DECODERS = ("fast", "generate")  # this package's greedy decoder, or transformers' generate (the same replies)
QA_INSTRUCTION = "Please answer the question:\n\nQ: {question}\nA:"  # the study's "qa_inst" context
SCORED = ("rel", "gen", "por")  # metrics scored against an answer; Loc. compares with the unedited model
SCORES = ("f1", "contains", "loc_tokens")  # a wild record's other scores, per metric: summarised as its metrics
# Words that end in "." without ending a sentence (lower case, without the dot).
ABBREVIATIONS = frozenset((
    "st", "mt", "ft", "dr", "mr", "mrs", "ms", "jr", "sr", "prof", "rev", "gen", "col", "lt", "sgt", "capt", "gov",
    "sen", "rep", "no", "vol", "vs", "etc", "inc", "ltd", "co", "corp", "bros", "ave", "blvd", "rd", "jan", "feb",
    "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "approx", "est", "dept", "univ", "fig",
    "ca",
))
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


@dataclass(frozen=True)
class WildSettings:
    """How the probes are asked; the defaults are the study's."""

    context: str = field(default="bare", metadata={"help": "bare (the probe prompt) or qa (instruction + chat)"})
    max_new_tokens: int = field(default=50, metadata={"help": "max new tokens of a reply"})
    decoder: str = field(default="fast", metadata={
        "help": "fast (decoding.greedy_ids) or generate (transformers'): the same replies, at different costs"})

    def __post_init__(self) -> None:
        if self.context not in CONTEXTS:
            raise ValueError(f"unknown --eval-context {self.context!r}; choose one of {', '.join(CONTEXTS)}")
        if self.decoder not in DECODERS:
            raise ValueError(f"unknown wild decoder {self.decoder!r}; choose one of {', '.join(DECODERS)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


# ---- answers: normalisation and scores ---------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD-style: lower case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(reply: str, answers: Iterable[str]) -> bool:
    return any(normalize_answer(reply) == normalize_answer(a) for a in answers)


def token_f1(reply: str, answers: Iterable[str]) -> float:
    """The best SQuAD token F1 of ``reply`` against any answer (1 when both normalise to nothing)."""
    best = 0.0
    predicted = normalize_answer(reply).split()
    for answer in answers:
        gold = normalize_answer(answer).split()
        if not predicted or not gold:
            best = max(best, float(predicted == gold))
            continue
        same = sum((Counter(predicted) & Counter(gold)).values())
        if same:
            precision, recall = same / len(predicted), same / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def contains(reply: str, answers: Iterable[str]) -> bool:
    """Whether a normalised answer occurs in the normalised reply as whole words."""
    text = f" {normalize_answer(reply)} "
    return any(f" {a} " in text for a in map(normalize_answer, answers) if a)


# ---- the stop rule -------------------------------------------------------------------------------------------


def _sentence_final(text: str, i: int, finished: bool) -> bool | None:
    """Whether the "." at ``text[i]`` ends a sentence; None while the next character is not generated yet."""
    if i + 1 < len(text):
        if not text[i + 1].isspace():
            return False  # "3.5", "U.S" inside a word
    elif not finished:
        return None
    words = text[:i].split()
    if not words:
        return True
    last = words[-1].rsplit(".", 1)[-1]  # "U.S" -> "S"
    return not ((len(last) == 1 and last.isalpha()) or last.lower() in ABBREVIATIONS)


def find_stop(text: str, finished: bool) -> int | None:
    """Index of the character that ends the reply (a newline or a sentence-final "."), None if none yet.

    ``finished``: the generation ended (end of sequence or the token limit), so a "." at the very end
    is final; during generation such a "." waits for the next character.
    """
    for i, ch in enumerate(text):
        if ch == "\n":
            return i
        if ch == ".":
            final = _sentence_final(text, i, finished)
            if final is None:
                return None
            if final:
                return i
    return None


def study_cut(text: str) -> str:
    """The reply under the study's stop strings "." and newline: everything before the first of them."""
    return re.split(r"[.\n]", text, maxsplit=1)[0].strip()


@dataclass(frozen=True)
class Reply:
    """One generated answer: its text (stop removed), its token ids and the study's "."-rule text."""

    text: str
    ids: tuple[int, ...]  # up to and including the token holding the stop, or the end-of-sequence token
    study_text: str


def _reply(tokenizer: Any, ids: list[int], eos: set[int]) -> Reply:
    end = next((j + 1 for j, t in enumerate(ids) if t in eos), len(ids))
    ids = ids[:end]
    raw = tokenizer.decode(ids, skip_special_tokens=True)
    stop = find_stop(raw, finished=True)
    if stop is not None:  # keep the tokens up to the one that produced the stop character
        end = next((n for n in range(1, len(ids) + 1)
                    if len(tokenizer.decode(ids[:n], skip_special_tokens=True)) > stop), len(ids))
        ids = ids[:end]
    text = raw if stop is None else raw[:stop]
    return Reply(text=text.strip(), ids=tuple(ids), study_text=study_cut(raw))


def context_text(tokenizer: Any, prompt: str, context: str) -> str:
    """The text the model continues: the bare prompt, or the QA instruction in the chat template."""
    if context == "bare":
        return prompt
    question = QA_INSTRUCTION.format(question=prompt)
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return question


def _stopped(reply: str) -> bool:
    return find_stop(reply, finished=False) is not None


def answer(lm: LoadedModel, prompts: Sequence[str], settings: WildSettings, owners: Sequence[int] | None = None,
           scope: Scope | None = None) -> list[Reply]:
    """Greedy replies to ``prompts`` in one left-padded batch, each cut by the stop rule.

    ``owners``/``scope``: row r is answered by model state ``owners[r]`` inside ``scope(owners)`` (per-case
    edits; ``decoding.greedy_ids``). None: the model as it is.
    """
    if not prompts:
        return []
    tokenizer = lm.tokenizer
    chat = settings.context == "qa" and bool(tokenizer.chat_template)
    texts = [context_text(tokenizer, p, settings.context) for p in prompts]
    if settings.decoder == "fast":
        rows = greedy_ids(lm, texts, settings.max_new_tokens, add_special_tokens=not chat, done=_stopped,
                          owners=owners, scope=scope)
    else:
        with scope(tuple(owners or (0,) * len(prompts))) if scope else contextlib.nullcontext():
            rows = generate_ids(lm, texts, settings.max_new_tokens, add_special_tokens=not chat,
                                done=_stopped).tolist()
    eos = eos_ids(lm)
    return [_reply(tokenizer, row, eos) for row in rows]


# ---- the evaluator -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WildProbe:
    metric: str
    kind: str
    prompt: str
    answers: tuple[str, ...]  # the target first, then its aliases


def wild_probes(case: EditCase) -> list[WildProbe]:
    """Every probe of a case, in the order of the teacher-forced batch."""
    probes = [WildProbe("rel", "rewrite", edit.prompt, (edit.target,)) for edit in case.requests]
    probes += [WildProbe("gen", "rephrase", text, (case.target,)) for text in case.rephrases]
    for metric, groups in (("por", case.portability), ("loc", case.locality)):
        for kind, items in groups.items():
            probes += [WildProbe(metric, kind, p.prompt, (p.answer, *p.aliases)) for p in items]
    return probes


@dataclass
class WildPreEdit:
    """A case answered by the unedited model, plus the other protocol's pending state when it runs too."""

    inner: PreEdit | None
    probes: list[WildProbe]
    replies: list[Reply]
    seconds: float
    hits: int = 0  # replies that came from the evaluation cache

    @property
    def cache(self) -> SuffixCache | None:
        return self.inner.cache if self.inner else None


def locality(reply: Reply, reference: Reply) -> dict[str, float]:
    """A locality probe's two verdicts: ``em`` (Loc.) the scored reply is unchanged, its normalised text up to
    the stop; ``tokens`` its token ids are, up to and including the token that holds the stop."""
    return {"em": float(normalize_answer(reply.text) == normalize_answer(reference.text)),
            "tokens": float(reply.ids == reference.ids)}


def _score(probes: Sequence[WildProbe], replies: Sequence[Reply], reference: Sequence[Reply] | None,
           ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-metric EM (Loc.: the same scored reply), F1, contained, Loc.'s token-identical rate and the
    detail; the per-probe scores."""
    rows: dict[str, list[float | None]] = {"em": [], "f1": [], "contains": [], "tokens": []}
    scores = []
    for i, (probe, reply) in enumerate(zip(probes, replies, strict=True)):
        values: dict[str, float | None] = dict.fromkeys(rows)
        if probe.metric != "loc":
            values.update(em=float(exact_match(reply.text, probe.answers)), f1=token_f1(reply.text, probe.answers),
                          contains=float(contains(reply.text, probe.answers)))
        elif reference is not None:
            values.update(locality(reply, reference[i]))
        for key, value in values.items():
            rows[key].append(value)
        scores.append(values)
    groups = [(p.metric, p.kind) for p in probes]
    em, detail = by_metric(groups, rows["em"])
    out = {"em": em, "f1": {m: v for m, v in by_metric(groups, rows["f1"])[0].items() if m in SCORED},
           "contains": {m: v for m, v in by_metric(groups, rows["contains"])[0].items() if m in SCORED},
           "loc_tokens": {"loc": by_metric(groups, rows["tokens"])[0]["loc"]}, "detail": detail}
    return out, scores


# The memory model's assumptions (``case_memory``): probes of a case (the first ZsRE test cases have 5) and
# tokens of a bare prompt (theirs have 5 to 16).
CASE_PROBES = 5
PROMPT_TOKENS = 32
MAX_ROWS = 64  # probes per generate call: bounds the key/value cache when a chunk of 100 cases is evaluated


def reply_memory(shape: ModelShape, reply: int, template: int = 0) -> int:
    """Bytes that generating one case's answers holds (``ModelShape.reply_cache``): ``CASE_PROBES`` rows of a
    prompt of ``template`` + ``PROMPT_TOKENS`` tokens and a ``reply``-token answer. One estimate for the runner,
    ``study plan`` and ``benchmarks/parallel_memory.py``."""
    return shape.reply_cache(CASE_PROBES, template + PROMPT_TOKENS + reply)


class WildEvaluator(Evaluator):
    """Generated answers to every probe, scored by exact match; beside another protocol's metrics or alone.

    ``inner`` is the benchmark's own evaluator (teacher-forced, or MQuAKE's) when ``--eval both``;
    its fields stay where they are and the wild metrics go under ``wild``. The probes of every case
    handed to ``before_many``/``after_many`` (a chunk evaluated at its end) are answered together, in
    generate calls of up to ``MAX_ROWS`` rows; each case is charged an equal share of the time. So are
    the cases of a parallel edit (``before_cases``/``after_cases``), each row by its own case's edited model.
    """

    wild_metrics: ClassVar[tuple[str, ...]] = METRICS

    def __init__(self, lm: LoadedModel, settings: WildSettings | None = None, inner: Evaluator | None = None) -> None:
        super().__init__(lm)
        self.settings = settings or WildSettings()
        if self.settings.decoder == "fast":
            check_greedy(lm)
        self.inner = inner
        self.metrics = inner.metrics if inner else ()

    def describe(self) -> dict[str, Any]:
        inner = (self.inner.describe() or {}) if self.inner else {}
        protocols = [TEACHER_FORCED, WILD] if self.inner else [WILD]
        # the decoder gives the same replies, so it is no part of a run's identity (a run resumes with either)
        wild = {k: v for k, v in asdict(self.settings).items() if k != "decoder"}
        return {**inner, "protocols": protocols, WILD: wild}

    def case_memory(self, shape: ModelShape) -> int:
        """The replies' key/value cache of one case (``reply_memory``, the prompt in the context's template, the
        longest reply); or the inner protocol's, if larger."""
        template = len(self.lm.tokenizer(context_text(self.lm.tokenizer, "", self.settings.context))["input_ids"])
        own = reply_memory(shape, self.settings.max_new_tokens, template)
        return max(own, self.inner.case_memory(shape) if self.inner else 0)

    def _answer(self, groups: Sequence[Sequence[WildProbe]], edits: CaseEdits | None = None,
                ) -> tuple[list[list[Reply]], float]:
        """Replies to every group's probes (rows of all groups batched together), and seconds per group.

        ``edits``: group i is case i of a parallel edit, and each row is answered by its own case's edited
        model: the decoder enters ``CaseEdits.applied`` with the owners of the rows in each forward pass.
        """
        start = time.perf_counter()
        prompts = [p.prompt for group in groups for p in group]
        owners = tuple(i for i, group in enumerate(groups) for _ in group)
        scope = (lambda rows: edits.applied(CaseRows(rows, len(groups)))) if edits else None
        replies: list[Reply] = []
        for first in range(0, len(prompts), MAX_ROWS):
            part = slice(first, first + MAX_ROWS)
            replies += answer(self.lm, prompts[part], self.settings, owners[part] if edits else None, scope)
        out, at = [], 0
        for group in groups:
            out.append(replies[at: at + len(group)])
            at += len(group)
        return out, (time.perf_counter() - start) / max(1, len(groups))

    def _pending(self, cases: Sequence[EditCase], inner: Sequence[PreEdit | None]) -> list[WildPreEdit]:
        """The cases answered by the unedited model, beside the inner evaluator's pending state. The replies of one
        call are one evaluation-cache entry: keyed by every prompt of the call, as they share generate batches."""
        probes = [wild_probes(case) for case in cases]
        start = time.perf_counter()
        sizes = [len(group) for group in probes]

        def key() -> dict[str, Any]:
            texts = [context_text(self.lm.tokenizer, p.prompt, self.settings.context) for g in probes for p in g]
            return {"texts": texts, "ids": self.lm.tokenizer(texts).input_ids if texts else [], "groups": sizes}

        replies, hit = through(
            self.eval_cache, WILD, {**asdict(self.settings), "max_rows": MAX_ROWS}, key,
            lambda: self._answer(probes)[0], lambda groups: [[asdict(r) for r in group] for group in groups],
            lambda groups: [[Reply(r["text"], tuple(r["ids"]), r["study_text"]) for r in group] for group in groups],
            lambda groups: [len(g) for g in groups] == sizes and all(
                isinstance(r["text"], str) and isinstance(r["study_text"], str)
                and all(isinstance(t, int) for t in r["ids"]) for g in groups for r in g))
        seconds = (time.perf_counter() - start) / max(1, len(cases))
        return [WildPreEdit(i, p, r, seconds, len(r) if hit else 0)
                for i, p, r in zip(inner, probes, replies, strict=True)]

    def _with_wild(self, inner: list[dict[str, Any]] | None, pres: Sequence[WildPreEdit],
                   edits: CaseEdits | None = None) -> list[dict[str, Any]]:
        """The inner evaluator's result fields (None: wild only) plus ``wild``, from the model's replies now
        (``edits``: case i's edited model answers case i's probes)."""
        out = inner if inner is not None else [{"eval_s": 0.0} for _ in pres]
        replies, seconds = self._answer([p.probes for p in pres], edits)
        for fields, pre, now in zip(out, pres, replies, strict=True):
            fields["wild"] = self._fields(pre, now, pre.seconds + seconds)
            fields["eval_s"] += pre.seconds + seconds
            if self.eval_cache is not None:
                fields["eval_cache_hits"] = fields.get("eval_cache_hits", 0) + pre.hits
        return out

    def before(self, case: EditCase, record_from: int | None) -> WildPreEdit:  # type: ignore[override]
        return self.before_many([case], record_from)[0]

    def before_many(self, cases: Sequence[EditCase], record_from: int | None,  # type: ignore[override]
                    ) -> list[WildPreEdit]:
        inner: list[PreEdit | None] = (list(self.inner.before_many(cases, record_from)) if self.inner
                                       else [None] * len(cases))
        return self._pending(cases, inner)

    def after(self, pre: WildPreEdit, replay: bool) -> dict[str, Any]:  # type: ignore[override]
        return self.after_many([pre], [replay])[0]

    def after_many(self, pres: Sequence[WildPreEdit], replays: Sequence[bool],  # type: ignore[override]
                   ) -> list[dict[str, Any]]:
        inner = self.inner.after_many([p.inner for p in pres], replays) if self.inner else None  # type: ignore[misc]
        return self._with_wild(inner, pres)

    def before_cases(self, cases: Sequence[EditCase], record_from: int | None) -> PreEdits:
        """The inner evaluator's ``before_cases`` (teacher forcing batches the B cases), and the unedited
        model's replies to every case's probes in shared batches."""
        inner = self.inner.before_cases(cases, record_from) if self.inner else PreEdits([None] * len(cases), [])
        return PreEdits(self._pending(cases, inner.cases), inner.batches)

    def after_cases(self, pre: PreEdits, edits: CaseEdits, replay: bool) -> list[dict[str, Any]]:
        """Every case of a parallel edit: the inner evaluator's ``after_cases``, and the replies of the B edited
        models to their own cases' probes in shared batches (``CaseEdits.applied``)."""
        inner = (self.inner.after_cases(PreEdits([p.inner for p in pre.cases], pre.batches), edits, replay)
                 if self.inner else None)
        return self._with_wild(inner, pre.cases, edits)

    @staticmethod
    def _fields(pre: WildPreEdit, replies: Sequence[Reply], seconds: float) -> dict[str, Any]:
        """The ``wild`` entry of a record: scores of the edited model's replies against the unedited ones."""
        post, scores = _score(pre.probes, replies, reference=pre.replies)
        before, _ = _score(pre.probes, pre.replies, reference=None)
        generations = []
        differs = em_changes = 0
        for probe, old, new, score in zip(pre.probes, pre.replies, replies, scores, strict=True):
            entry: dict[str, Any] = {"metric": probe.metric, "kind": probe.kind, "prompt": probe.prompt,
                                     "answer": probe.answers[0], "pre": old.text, "post": new.text}
            if probe.metric == "loc":
                entry.update(kept=score["em"], tokens_identical=score["tokens"])
            else:
                entry.update(em=score["em"], f1=round(score["f1"], 4), contains=score["contains"])
                if new.study_text != new.text:
                    differs += 1
                    entry["study"] = new.study_text
                    em_changes += exact_match(new.study_text, probe.answers) != bool(score["em"])
            generations.append(entry)
        return {
            "post": post["em"],
            "pre": {m: v for m, v in before["em"].items() if m in SCORED},
            "f1": post["f1"],
            "contains": post["contains"],
            "loc_tokens": post["loc_tokens"],
            "detail": post["detail"],
            "study_rule": {"replies": sum(p.metric != "loc" for p in pre.probes), "differs": differs,
                           "em_changes": em_changes},
            "generations": generations,
            "eval_s": round(seconds, 4),
        }


def wild_view(record: dict[str, Any]) -> dict[str, Any]:
    """A record with its wild metrics in the place of the teacher-forced ones, for summaries and paired stats."""
    wild = record["wild"]
    view = {k: v for k, v in record.items() if k not in ("pre", "post", "detail", "wild", "generations")}
    scores = {part: wild[part] for part in SCORES if part in wild}  # loc_tokens: not in records before it existed
    return {**view, "post": wild["post"], "pre": wild["pre"], **scores, "study_rule": wild["study_rule"],
            "eval_s": wild["eval_s"]}


def protocol_records(records: Sequence[dict[str, Any]], protocol: str) -> list[dict[str, Any]]:
    """The records of one protocol, each with that protocol's metrics as ``post``/``pre``."""
    if protocol == WILD:
        return [wild_view(r) for r in records if "wild" in r]
    return [r for r in records if "post" in r]
