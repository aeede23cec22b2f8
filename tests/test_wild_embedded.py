"""The wild protocol and the ability check on the real embedded model (SmolLM2-135M-Instruct): slow."""

from __future__ import annotations

import pytest

from overtone.evaluation import WildSettings
from overtone.evaluation.ability import AbilityMonitor
from overtone.evaluation.wild import answer, contains

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
