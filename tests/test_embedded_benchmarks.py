"""The benchmarks' protocols on the real embedded model (SmolLM2-135M-Instruct, its chat template): slow."""

from __future__ import annotations

import pytest
from helpers import assert_same_state, state

from overtone import Evaluator, load_benchmark, make_editor
from overtone.evaluation import GenerationSettings, MQuAKEEvaluator
from overtone.evaluation.generation import answer_span, generate, mentions, single_hop_prompt
from overtone.objectives import CrossEntropy
from overtone.runner import edit_chunk

pytestmark = pytest.mark.slow


def test_chat_generation_is_batch_invariant_and_answers_a_known_fact(smollm):
    questions = ["What is the official language of Australia?", "What is the capital city of France?", "Who?"]
    conversations = [single_hop_prompt(q) for q in questions]
    batched = generate(smollm, conversations, max_new_tokens=12, temperature=0.0, seed=0)
    assert batched == [generate(smollm, [c], max_new_tokens=12, temperature=0.0, seed=0)[0] for c in conversations]
    assert mentions(answer_span(batched[0], require_marker=False), ["English"]), batched[0]


def test_mquake_case_and_a_continual_chunk_leave_the_model_unedited(smollm):
    before = state(smollm)
    editor = make_editor("ft-m", smollm, CrossEntropy())
    case = load_benchmark("mquake", limit=1)[0]
    evaluator = MQuAKEEvaluator(smollm, GenerationSettings(single_hop_tokens=12, multi_hop_tokens=40,
                                                           multi_hop_questions=1))
    (record,) = edit_chunk(editor, evaluator, [case])
    assert record["post"]["rel"] > record["pre"]["rel"] and len(record["generations"]) == 5
    records = edit_chunk(editor, Evaluator(smollm), load_benchmark("wikidata-counterfact", limit=3))
    assert all(r["post"]["rel"] > 0.5 for r in records)
    assert_same_state(smollm, before)
