"""MQuAKE's generation-based evaluation: batched generation, answer matching, the evaluator on an edited model."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_state, state

from overtone.benchmarks import load_benchmark
from overtone.benchmarks.mquake import MULTI_HOP, SINGLE_HOP
from overtone.editors import FTM, FTMConfig
from overtone.evaluation import GenerationSettings, MQuAKEEvaluator
from overtone.evaluation.generation import (
    MULTI_HOP_SYSTEM,
    SINGLE_HOP_USER,
    ReplyDone,
    answer_line_complete,
    answer_span,
    case_seed,
    generate,
    mentions,
    multi_hop_prompt,
    render,
    single_hop_prompt,
)
from overtone.objectives import CrossEntropy
from overtone.runner import edit_chunk


def ask(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def test_batched_left_padded_generation_equals_one_at_a_time(any_tiny, zsre_cases):
    prompts = [zsre_cases[0].prompt, "Who?", zsre_cases[3].rephrases[0], zsre_cases[5].prompt[:12]]
    batched = generate(any_tiny, [ask(p) for p in prompts], max_new_tokens=8, temperature=0.0, seed=0)
    alone = [generate(any_tiny, [ask(p)], max_new_tokens=8, temperature=0.0, seed=0)[0] for p in prompts]
    assert batched == alone
    assert len({len(p) for p in prompts}) > 1  # the batch really needed padding


def test_sampling_is_seeded_and_leaves_the_global_generator_alone(tiny_llama):
    conversations = [ask("The capital of France is"), ask("Who?")]
    rng = torch.random.get_rng_state()
    first = generate(tiny_llama, conversations, max_new_tokens=10, temperature=1.0, seed=7)
    assert torch.equal(rng, torch.random.get_rng_state())
    assert generate(tiny_llama, conversations, max_new_tokens=10, temperature=1.0, seed=7) == first
    others = {tuple(generate(tiny_llama, conversations, max_new_tokens=10, temperature=1.0, seed=s)) for s in range(4)}
    assert len(others) > 1
    assert case_seed(0, "mquake/3", SINGLE_HOP) == case_seed(0, "mquake/3", SINGLE_HOP) != case_seed(
        0, "mquake/3", MULTI_HOP)


@pytest.mark.parametrize(("reply", "marker_needed", "span"), [
    ("Final answer: Arabic\nQuestion: next", True, "Arabic"),
    ("Subquestion: who?\nGenerated answer: X\nfinal ANSWER:   Arabic language.\nmore", True, "Arabic language."),
    ("Final answer:\nArabic", True, "Arabic"),
    ("The official language is Arabic.", True, None),
    (" Madonna\nQuestion: who else?", False, "Madonna"),
    ("I think so.\nFinal answer: Madonna", False, "Madonna"),
])
def test_answer_span(reply, marker_needed, span):
    assert answer_span(reply, require_marker=marker_needed) == span


def test_answers_match_as_whole_words_ignoring_case():
    assert mentions("arabic, mostly", ["Arabic"])
    assert not mentions("Narendra", ["ar"])  # a short alias does not match inside a word
    assert mentions("it is AR.", ["ar"])
    assert mentions("Flag: 🇬🇧", ["UK", "🇬🇧"])
    assert not mentions(None, ["Arabic"]) and not mentions("", ["Arabic"])


def test_a_row_stops_once_its_final_answer_line_is_complete(tokenizer):
    prompt = tokenizer("Q: who? A:")["input_ids"]
    rows = [prompt + tokenizer(reply)["input_ids"] for reply in
            (" Final answer: Paris\n", " Final answer: Par", " Paris\n")]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    stop = ReplyDone(tokenizer, len(prompt), answer_line_complete)
    assert stop(ids, torch.zeros(3, 1)).tolist() == [True, False, False]


def test_prompts_are_the_papers_in_the_chat_template(tokenizer):
    single = single_hop_prompt("Who performed Hey Jude?")
    assert single[0]["content"].startswith("You are a helpful AI assistant. Answer questions directly.")
    assert single[1]["content"] == SINGLE_HOP_USER.format(question="Who performed Hey Jude?")
    assert single[1]["content"].endswith("Question: Who performed Hey Jude?\nAnswer:")
    multi = multi_hop_prompt("Q?")
    assert multi[0]["content"] == MULTI_HOP_SYSTEM and "Final answer: Jill Biden\nQuestion: Q?" in multi[1]["content"]
    assert render(tokenizer, single).startswith("You are a helpful AI assistant.")  # no template: plain text


@pytest.fixture(scope="module")
def mquake_case():
    return load_benchmark("mquake", limit=1)[0]


def test_mquake_case_is_edited_in_order_scored_by_generation_and_reverted(tiny_llama, mquake_case):
    before = state(tiny_llama)
    editor = FTM(tiny_llama, FTMConfig(layer=2, lr=0.1, steps=2), CrossEntropy())
    evaluator = MQuAKEEvaluator(tiny_llama, GenerationSettings(single_hop_tokens=3, multi_hop_tokens=4,
                                                               multi_hop_questions=2))
    (record,) = edit_chunk(editor, evaluator, [mquake_case])
    assert_same_state(tiny_llama, before)
    assert set(record["post"]) == {"rel", "sng_hop", "mlt_hop"} and set(record["pre"]) == {"rel"}
    assert record["steps"] == 8 and len(record["losses"]) == 4  # four rewrites, two steps each
    kinds = [g["kind"] for g in record["generations"]]
    assert kinds == [SINGLE_HOP] * 4 + [MULTI_HOP] * 2
    assert record["post"]["sng_hop"] == float(all(g["correct"] for g in record["generations"][:4]))
    assert set(record["detail"]["por"]) == {SINGLE_HOP, MULTI_HOP}  # teacher-forced hop answers, as detail
    again = edit_chunk(editor, evaluator, [mquake_case])[0]
    assert again["generations"] == record["generations"]  # seeded per case
