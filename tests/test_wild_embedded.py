"""The wild protocol and the ability check on the real embedded model (SmolLM2-135M-Instruct): slow."""

from __future__ import annotations

import contextlib

import pytest

from overtone import load_benchmark, make_editor
from overtone.evaluation import WildSettings
from overtone.evaluation.ability import AbilityMonitor
from overtone.evaluation.decoding import eos_ids, greedy_ids
from overtone.evaluation.generation import generate_ids
from overtone.evaluation.wild import _stopped, answer, contains, context_text, wild_probes
from overtone.models.per_case import CaseRows
from overtone.objectives import CrossEntropy

pytestmark = pytest.mark.slow


def test_the_unedited_model_knows_every_shipped_fact_and_the_slice_has_its_size(smollm):
    monitor = AbilityMonitor(smollm)
    reference = monitor.measure_reference()
    assert len(reference["known"]) == len(monitor.facts) == 35  # the list was selected on this model
    assert monitor.describe()["tokens"] == 2042 and len(monitor.samples) == 64
    assert 5 < reference["ppl"] < 100


def test_the_qa_context_answers_in_the_chat_template_alone_or_batched(smollm):
    questions = ["What is the capital city of France?", "Which language is spoken in Brazil?", "Who?"]
    settings = WildSettings(context="qa", max_new_tokens=30)
    replies = answer(smollm, questions, settings)
    assert replies == [answer(smollm, [q], settings)[0] for q in questions]
    assert contains(replies[0].text, ["Paris"]), replies[0]


def test_the_fast_decoder_gives_generates_reply_ids_on_zsre_probes_with_and_without_per_case_edits(smollm):
    """Real ZsRE probes, both contexts (qa: the chat template's system prompt is the shared prefix), the unedited
    model and three parallel FT-M edits answering their own cases' rows: every reply's ids, up to the token after
    which the stop rule held, are greedy ``generate``'s on the same batch."""
    cases = load_benchmark("zsre", limit=3)
    prompts = [p.prompt for case in cases for p in wild_probes(case)]
    owners = tuple(i for i, case in enumerate(cases) for _ in wild_probes(case))
    edits = make_editor("ft-m", smollm, CrossEntropy()).edit_parallel(cases)

    def scope(rows: tuple[int, ...]):
        return edits.applied(CaseRows(rows, len(cases)))

    tokenizer, eos, limit = smollm.tokenizer, eos_ids(smollm), 50
    replies = {}
    for context in ("bare", "qa"):
        chat = context == "qa"
        texts = [context_text(tokenizer, p, context) for p in prompts]
        for edited in (False, True):
            with scope(owners) if edited else contextlib.nullcontext():
                generated = generate_ids(smollm, texts, limit, add_special_tokens=not chat, done=_stopped).tolist()
            reference = []
            for row in generated:  # up to the end of sequence, the limit or the stop rule, as generate stopped
                n = next(n for n in range(1, limit + 1) if n == limit or row[n - 1] in eos
                         or _stopped(tokenizer.decode(row[:n], skip_special_tokens=True)))
                reference.append(row[:n])
            fast = greedy_ids(smollm, texts, limit, add_special_tokens=not chat, done=_stopped,
                              owners=owners if edited else None, scope=scope if edited else None)
            assert fast == reference, (context, edited)
            replies[context, edited] = fast
    assert any(replies[c, True] != replies[c, False] for c in ("bare", "qa")), "the edits should change some replies"
