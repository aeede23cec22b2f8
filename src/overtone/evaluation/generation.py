"""Generation-based evaluation: MQuAKE's single- and multi-hop questions, as in the paper's Appendix B.2.

After a case's edits the model answers each question in free text: the paper's 1-shot prompt (direct
answer for single-hop questions, chain of thought for multi-hop ones) inside the model's chat
template, sampled at temperature 0.1 with a seed derived from the run's seed and the case id, at
most 30 / 200 new tokens. A question is answered correctly when the new answer or one of its aliases
appears, as a whole word and ignoring case, in the answer span:

* the rest of the line after the first "Final answer:" of the reply;
* for a single-hop reply without that marker, its first line (the prompt ends in "Answer:", so the
  reply itself is the answer). A multi-hop reply without the marker is wrong.

Per case, following Zhong et al. (2023), whose rubric the paper follows: Sng-Hop is 1 when every
single-hop question is answered correctly, Mlt-Hop is 1 when any of the multi-hop questions is.
Rel. is the teacher-forced accuracy on the rewrites (``teacher_forced.py``); Avg. is the mean of the
three. Every reply is kept in the run's ``cases.jsonl``.

Cost: generation dominates on a CPU. A row stops as soon as its "Final answer:" line is complete; a
multi-hop question still takes up to 200 decoding steps. ``GenerationSettings`` can lower the token
limits and the number of multi-hop paraphrases asked per case.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from overtone.benchmarks.cases import EditCase, Probe
from overtone.benchmarks.mquake import MULTI_HOP, SINGLE_HOP
from overtone.evaluation.teacher_forced import Evaluator, PreEdit, PreEdits
from overtone.models.loading import LoadedModel

if TYPE_CHECKING:
    from overtone.editors.parallel import CaseEdits

# The prompts of the paper's Appendix B.2, word for word. The extracted paper text lost its line
# breaks; we put the instructions in the system turn and the example plus the question in the user turn.
SINGLE_HOP_SYSTEM = (
    "You are a helpful AI assistant. Answer questions directly. Always format your response as:\n"
    "Final answer: [concise and direct final answer]"
)
SINGLE_HOP_USER = (
    "Question: Who is the spouse of the head of state in United States of America?\n"
    "Answer: Jill Biden\n"
    "Question: {question}\n"
    "Answer:"
)
MULTI_HOP_SYSTEM = (
    "You are a helpful AI assistant. For each question:\n"
    "1. Break it down into simpler subquestions\n"
    "2. Answer each subquestion step by step.\n"
    '3. Use your answers to provide a final answer after "Final answer: "\n'
    "Always format your response as:\n"
    "Subquestion: [your subquestion]\n"
    "Generated answer: [your answer]\n"
    "Final answer: [concise and direct final answer]"
)
MULTI_HOP_USER = (
    "Question: Who is the spouse of the head of state in United States of America?\n"
    "Subquestion: Who is the head of state in United States of America?\n"
    "Answer: The head of state in United States of America is Joe Biden.\n"
    "Subquestion: Who is the spouse of Joe Biden?\n"
    "Answer: The spouse of Joe Biden is Jill Biden.\n"
    "Final answer: Jill Biden\n"
    "Question: {question}"
)
MARKER = "final answer:"

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class GenerationSettings:
    """How MQuAKE's questions are answered; the defaults are the paper's."""

    temperature: float = field(default=0.1, metadata={"help": "sampling temperature (0: greedy)"})
    single_hop_tokens: int = field(default=30, metadata={"help": "max new tokens of a single-hop answer"})
    multi_hop_tokens: int = field(default=200, metadata={"help": "max new tokens of a multi-hop answer"})
    multi_hop_questions: int | None = field(
        default=None, metadata={"help": "ask only the first k paraphrases of the multi-hop question (all: None)"})
    seed: int = field(default=0, metadata={"help": "seed of the per-case sampling streams"})

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.single_hop_tokens < 1 or self.multi_hop_tokens < 1:
            raise ValueError("the max new tokens must be >= 1")
        if self.multi_hop_questions is not None and self.multi_hop_questions < 1:
            raise ValueError(f"multi_hop_questions must be >= 1, got {self.multi_hop_questions}")


def answer_span(reply: str, require_marker: bool) -> str | None:
    """The part of a reply that is scored (module docstring), None when there is none."""
    at = reply.lower().find(MARKER)
    if at >= 0:
        return reply[at + len(MARKER):].lstrip().split("\n", 1)[0].strip()
    if require_marker:
        return None
    return reply.strip().split("\n", 1)[0].strip()


def mentions(span: str | None, answers: Sequence[str]) -> bool:
    """Whether one of ``answers`` occurs in ``span`` as a whole word, ignoring case."""
    if not span:
        return False
    return any(re.search(rf"(?<!\w){re.escape(a.strip())}(?!\w)", span, flags=re.IGNORECASE)
               for a in answers if a.strip())


def answer_line_complete(reply: str) -> bool:
    """Whether a reply holds a finished "Final answer:" line: the rest cannot change the score."""
    at = reply.lower().find(MARKER)
    return at >= 0 and "\n" in reply[at + len(MARKER):].lstrip()


class ReplyDone(StoppingCriteria):
    """Stops each row once ``done`` holds for its decoded reply so far (rows finish independently)."""

    def __init__(self, tokenizer: Any, prompt_length: int, done: Callable[[str], bool]) -> None:
        self.tokenizer, self.prompt_length, self.done = tokenizer, prompt_length, done

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        replies = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([self.done(reply) for reply in replies], dtype=torch.bool, device=input_ids.device)


def render(tokenizer: Any, conversation: Conversation) -> str:
    """The conversation in the model's chat template (plain text for a model without one)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(turn["content"] for turn in conversation) + "\n"


@torch.no_grad()
def generate_ids(lm: LoadedModel, texts: Sequence[str], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                 add_special_tokens: bool = True, done: Callable[[str], bool] | None = None) -> torch.Tensor:
    """The generated token ids [B, n] of ``texts`` in one left-padded batch, sampled with ``seed`` (greedy at 0).

    Left padding with the attention mask gives every row its unpadded positions, so a row's reply does
    not depend on the other rows (tested against one-at-a-time generation on every architecture). A
    row stops at end of sequence, after ``max_new_tokens``, or once ``done(reply so far)`` holds; a
    stopped row is filled with the pad token (when the model has an end-of-sequence token).
    """
    tokenizer = lm.tokenizer
    enc = tokenizer(list(texts), padding=True, padding_side="left", return_tensors="pt",
                    add_special_tokens=add_special_tokens).to(lm.device)
    length = enc["input_ids"].shape[1]
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0
        else {"do_sample": False}
    )
    stopping = StoppingCriteriaList([ReplyDone(tokenizer, length, done)] if done else [])
    devices = [lm.device] if lm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                stopping_criteria=stopping, **sampling)
    return out[:, length:]


def complete(lm: LoadedModel, texts: Sequence[str], max_new_tokens: int, temperature: float, seed: int,
             stop_at_answer: bool = False, add_special_tokens: bool = True) -> list[str]:
    """Continuations of ``texts`` (already rendered) in one left-padded batch; ``generate`` without the template."""
    ids = generate_ids(lm, texts, max_new_tokens, temperature, seed, add_special_tokens,
                       done=answer_line_complete if stop_at_answer else None)
    return lm.tokenizer.batch_decode(ids, skip_special_tokens=True)


def generate(lm: LoadedModel, conversations: Sequence[Conversation], max_new_tokens: int, temperature: float,
             seed: int, stop_at_answer: bool = True) -> list[str]:
    """Replies to ``conversations`` in the model's chat template, batched as ``generate_ids``."""
    texts = [render(lm.tokenizer, c) for c in conversations]
    return complete(lm, texts, max_new_tokens, temperature, seed, stop_at_answer,
                    add_special_tokens=not lm.tokenizer.chat_template)


def single_hop_prompt(question: str) -> Conversation:
    return [{"role": "system", "content": SINGLE_HOP_SYSTEM},
            {"role": "user", "content": SINGLE_HOP_USER.format(question=question)}]


def multi_hop_prompt(question: str) -> Conversation:
    return [{"role": "system", "content": MULTI_HOP_SYSTEM},
            {"role": "user", "content": MULTI_HOP_USER.format(question=question)}]


def case_seed(seed: int, case_id: str, kind: str) -> int:
    """A sampling seed per case and question kind, independent of the order in which cases run."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{case_id}:{kind}".encode()).digest()[:4], "little")


class MQuAKEEvaluator(Evaluator):
    """Rel. (teacher-forced, on the rewrites) plus generated answers to MQuAKE's single- and multi-hop questions."""

    metrics: ClassVar[tuple[str, ...]] = ("rel", "sng_hop", "mlt_hop")

    def __init__(self, lm: LoadedModel, settings: GenerationSettings | None = None) -> None:
        super().__init__(lm)
        self.settings = settings or GenerationSettings()

    def describe(self) -> dict[str, Any]:
        return {"generation": asdict(self.settings)}

    def _ask(self, case_id: str, kind: str, probes: Sequence[Probe], prompt: Callable[[str], Conversation],
             max_new_tokens: int) -> list[dict[str, Any]]:
        if not probes:
            return []
        replies = generate(self.lm, [prompt(p.prompt) for p in probes], max_new_tokens, self.settings.temperature,
                           case_seed(self.settings.seed, case_id, kind))
        answers = []
        for probe, reply in zip(probes, replies, strict=True):
            span = answer_span(reply, require_marker=kind == MULTI_HOP)
            answers.append({"kind": kind, "question": probe.prompt, "reply": reply, "span": span,
                            "correct": mentions(span, (probe.answer, *probe.aliases))})
        return answers

    def after(self, pre: PreEdit, replay: bool) -> dict[str, Any]:
        fields = super().after(pre, replay)
        start = time.perf_counter()
        case, s = pre.probes.case, self.settings
        single = self._ask(case.case_id, SINGLE_HOP, case.portability.get(SINGLE_HOP, ()), single_hop_prompt,
                           s.single_hop_tokens)
        multi = self._ask(case.case_id, MULTI_HOP, case.portability.get(MULTI_HOP, ())[: s.multi_hop_questions],
                          multi_hop_prompt, s.multi_hop_tokens)
        hops = {SINGLE_HOP: [a["correct"] for a in single], MULTI_HOP: [a["correct"] for a in multi]}
        fields["post"] = {
            "rel": fields["post"]["rel"],
            "sng_hop": float(all(hops[SINGLE_HOP])) if single else None,
            "mlt_hop": float(any(hops[MULTI_HOP])) if multi else None,
        }
        fields["pre"] = {"rel": fields["pre"]["rel"]}
        # teacher-forced accuracy on the hop answers stays in detail["por"]; the share of questions answered:
        fields["detail"]["answered"] = {k: sum(v) / len(v) for k, v in hops.items() if v}
        fields["generations"] = single + multi
        fields["eval_s"] += time.perf_counter() - start
        return fields

    def before_cases(self, cases: Sequence[EditCase], record_from: int | None) -> PreEdits:
        return self.before_each(cases, record_from)

    def after_cases(self, pre: PreEdits, edits: CaseEdits, replay: bool) -> list[dict[str, Any]]:
        """One case at a time, each with its own edit on every row: a case's answers are sampled from its own
        seeded stream, which one batch of several cases' questions would not keep."""
        return self.after_each(pre, edits)
