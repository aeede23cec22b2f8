"""General ability during continual editing: does the edited model still model text and recall other facts?

At the end of each chunk of edits (before the revert), and with ``every`` = K also after every K edits
of the chunk (the drift curve of a long sequence, e.g. after 10, 20, ..., 100 edits of T = 100), two fixed
probes are measured and compared with the unedited model:

* perplexity on a held-out slice of the offline Wikipedia text: the first 64 tokens of each of the 64
  held-out articles of ``wiki.utf8`` (every 36th article, ``overtone.corpus``), which the ROME/MEMIT
  statistics never read: 2,042 SmolLM2 tokens, 1,978 of them predicted;
* greedy answers to general facts (``data/ability/general_facts.json``, SOURCES.md): the fact's cloze
  prompt is continued with the wild protocol's stop rule, at most 16 new tokens, and the fact is right
  when the answer or an alias occurs in the reply as whole words. Only the facts the unedited model gets
  right count; the share still right and the share answered with identical token ids are reported.

The unedited reference is measured once per run, before the first edit. On the embedded model one
measurement takes a few seconds on one CPU thread (docs/wild.md).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import torch

from overtone.corpus import CorpusError, load_corpus
from overtone.evaluation.wild import WildSettings, answer, contains
from overtone.models.loading import LoadedModel
from overtone.models.replay import forward_hidden
from overtone.tokens import plan_batches

FACTS_FILE = "ability/general_facts.json"


@dataclass(frozen=True)
class Fact:
    prompt: str
    answers: tuple[str, ...]  # the answer first, then its aliases


@dataclass(frozen=True)
class AbilitySettings:
    """What the ability check measures; part of a run's configuration."""

    corpus: str = field(default="wikipedia", metadata={"help": "corpus whose held-out documents give the perplexity"})
    doc_tokens: int = field(default=64, metadata={"help": "first tokens of each held-out document scored"})
    fact_tokens: int = field(default=16, metadata={"help": "max new tokens of a fact's answer"})
    every: int = field(default=0, metadata={"help": "also measure after every K edits of a chunk (0: at its end only)"})

    def __post_init__(self) -> None:
        if self.doc_tokens < 2 or self.fact_tokens < 1 or self.every < 0:
            raise ValueError("doc_tokens must be >= 2, fact_tokens >= 1 and every >= 0")


def load_facts() -> list[Fact]:
    """The shipped general facts (data/ability/general_facts.json)."""
    records = json.loads(resources.files("overtone.data").joinpath(FACTS_FILE).read_text(encoding="utf-8"))
    return [Fact(r["prompt"], (r["answer"], *r.get("aliases", ()))) for r in records]


class AbilityMonitor:
    """Held-out perplexity and general-fact answers, measured now and compared with the unedited model."""

    def __init__(self, lm: LoadedModel, settings: AbilitySettings | None = None,
                 facts: list[Fact] | None = None) -> None:
        self.lm = lm
        self.settings = settings or AbilitySettings()
        documents = load_corpus(self.settings.corpus).held_out_documents()
        if not documents:
            raise CorpusError(f"corpus {self.settings.corpus!r} holds out no documents for the perplexity check")
        encoded = lm.tokenizer(documents, verbose=False)["input_ids"]
        self.samples = [ids[: self.settings.doc_tokens] for ids in encoded if len(ids) >= 2]
        self.facts = load_facts() if facts is None else facts
        self.reference: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        settings = asdict(self.settings)
        if not settings["every"]:  # the default is left out, so that runs recorded before the option resume
            del settings["every"]
        return {**settings, "documents": len(self.samples), "tokens": sum(map(len, self.samples)),
                "facts": len(self.facts)}

    def due(self, before: int, after: int, total: int) -> bool:
        """Whether a measurement inside a chunk of ``total`` edits is due after edits ``before`` .. ``after``
        (a batch edit may step over a multiple of ``every``); the chunk's end is measured anyway."""
        every = self.settings.every
        return bool(every) and after < total and after // every > before // every

    @torch.no_grad()
    def perplexity(self) -> float:
        """exp of the mean negative log-likelihood per predicted token over the held-out documents."""
        adapter, device = self.lm.adapter, self.lm.device
        pad = self.lm.tokenizer.pad_token_id or 0
        nll, count = 0.0, 0
        for batch in plan_batches(self.samples, batch_tokens=2048):
            rows = [self.samples[i] for i in batch]
            width = len(rows[0])
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, row in enumerate(rows):
                ids[r, : len(row)] = torch.tensor(row)
                mask[r, : len(row)] = 1
            hidden, _ = forward_hidden(adapter, ids.to(device), mask.to(device))
            for r, row in enumerate(rows):  # one row's logits at a time: [n, V] stays small
                logits = adapter.logits(hidden[r, : len(row) - 1]).float()
                nll += torch.nn.functional.cross_entropy(logits, ids[r, 1: len(row)].to(device),
                                                         reduction="sum").item()
                count += len(row) - 1
        return math.exp(nll / count)

    def _answers(self, facts: list[Fact]) -> list[tuple[bool, tuple[int, ...]]]:
        replies = answer(self.lm, [f.prompt for f in facts], WildSettings(max_new_tokens=self.settings.fact_tokens))
        return [(contains(r.text, f.answers), r.ids) for f, r in zip(facts, replies, strict=True)]

    def measure_reference(self) -> dict[str, Any]:
        """Measure the unedited model (once): its perplexity and the facts it answers right."""
        if self.reference is None:
            start = time.perf_counter()
            answers = self._answers(self.facts)
            known = [i for i, (right, _) in enumerate(answers) if right]
            self.reference = {"ppl": self.perplexity(), "known": known, "ids": [answers[i][1] for i in known],
                              "seconds": time.perf_counter() - start}
        return self.reference

    def measure(self) -> dict[str, Any]:
        """The current (edited) model against the unedited reference; fractions in [0, 1]."""
        reference = self.measure_reference()
        start = time.perf_counter()
        known = [self.facts[i] for i in reference["known"]]
        answers = self._answers(known)
        right = sum(ok for ok, _ in answers)
        same = sum(ids == ref for (_, ids), ref in zip(answers, reference["ids"], strict=True))
        return {
            "ppl": round(self.perplexity(), 4),
            "ppl_unedited": round(reference["ppl"], 4),
            "facts_right": right / len(known) if known else None,
            "facts_same": same / len(known) if known else None,
            "facts": len(known),
            "seconds": round(time.perf_counter() - start, 3),
        }
