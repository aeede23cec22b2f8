"""Evaluation in the wild: normalisation and scores, the stop rule, batched replies, locality, the records."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_state, state

from overtone.editors import FTM, FTMConfig
from overtone.evaluation import Evaluator, WildEvaluator, WildSettings, make_evaluator, protocol_records
from overtone.evaluation.generation import generate_ids
from overtone.evaluation.wild import (
    Reply,
    WildPreEdit,
    WildProbe,
    _reply,
    answer,
    contains,
    context_text,
    exact_match,
    find_stop,
    locality,
    normalize_answer,
    study_cut,
    token_f1,
    wild_probes,
)
from overtone.objectives import CrossEntropy
from overtone.runner import edit_chunk, summarize

SHORT = WildSettings(max_new_tokens=10)


@pytest.mark.parametrize(("text", "normalised"), [
    ("The Beatles.", "beatles"),
    ("  An apple, a  day ", "apple day"),
    ("U.S.", "us"),
    ("Saint-Étienne", "saintétienne"),
    ("theatre of the absurd", "theatre of absurd"),  # "the" inside a word stays
])
def test_squad_normalisation(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_match_f1_and_contained_use_the_aliases():
    assert exact_match("the U.S.", ["United States", "US"]) and not exact_match("US Army", ["US"])
    assert token_f1("Barack Obama", ["Obama"]) == pytest.approx(2 / 3)
    assert token_f1("Obama", ["Michelle", "Barack Obama"]) == pytest.approx(2 / 3)
    assert token_f1("", ["Paris"]) == 0.0 and token_f1("", ["the"]) == 1.0  # both normalise to nothing
    assert contains("He was born in St. Louis, Missouri", ["St. Louis"])
    assert not contains("Parisian food", ["Paris"])  # whole words only
    assert not contains("anything", ["the"])  # an answer that normalises to nothing is never contained


@pytest.mark.parametrize(("raw", "reply"), [
    (" Paris. It is the capital", "Paris"),
    (" St. Louis is a city. It lies", "St. Louis is a city"),
    (" 3.5 million people.", "3.5 million people"),
    (" The U.S. Army. Then", "The U.S. Army"),
    (" Dr. Who. Yes", "Dr. Who"),
    (" Washington D.C.", "Washington D.C."),
    (" Mount Everest\nNext line", "Mount Everest"),
    ("\nParis", ""),  # the study's rule: a reply that starts with a newline is empty
    (" no stop at all", "no stop at all"),
])
def test_the_stop_rule_ends_at_a_newline_or_a_sentence_final_full_stop(raw, reply):
    stop = find_stop(raw, finished=True)
    assert (raw if stop is None else raw[:stop]).strip() == reply


def test_a_full_stop_at_the_end_waits_for_the_next_character():
    assert find_stop(" Paris.", finished=False) is None  # could still be "Paris.5" or "St."
    assert find_stop(" Paris.", finished=True) == 6
    assert find_stop(" Paris. ", finished=False) == 6
    assert find_stop(" St.", finished=True) is None


def test_the_studys_rule_cuts_at_any_full_stop():
    assert study_cut(" St. Louis is a city.") == "St"
    assert study_cut(" 3.5 million") == "3"
    assert study_cut(" Paris\nmore") == "Paris"


def test_reply_ids_end_at_the_token_holding_the_stop_or_at_end_of_sequence(tokenizer):
    ids = tokenizer(" Paris. It is big")["input_ids"]
    reply = _reply(tokenizer, ids, eos=set())
    assert reply.text == "Paris" and reply.study_text == "Paris"
    kept = tokenizer.decode(list(reply.ids))
    assert kept.rstrip().endswith(".") and tokenizer.decode(ids).startswith(kept)
    assert tokenizer.decode(list(reply.ids[:-1])).count(".") == 0  # no token more than needed
    eos = tokenizer.eos_token_id
    plain = tokenizer(" Paris is big")["input_ids"]
    ended = _reply(tokenizer, [*plain, eos, *plain], eos={eos})
    assert ended.ids == (*plain, eos) and ended.text == "Paris is big"


def test_contexts_are_the_bare_prompt_or_the_qa_instruction(tokenizer):
    assert context_text(tokenizer, "Who wrote Emma?", "bare") == "Who wrote Emma?"
    # no chat template: the instruction as plain text, ending in "A:" so the model answers next
    assert context_text(tokenizer, "Who wrote Emma?", "qa") == "Please answer the question:\n\nQ: Who wrote Emma?\nA:"


def test_batched_replies_equal_one_at_a_time_on_every_architecture(any_tiny, zsre_cases):
    prompts = [zsre_cases[0].prompt, "Who?", zsre_cases[3].rephrases[0], zsre_cases[5].prompt[:12]]
    for settings in (SHORT, WildSettings(context="qa", max_new_tokens=6)):
        batched = answer(any_tiny, prompts, settings)
        alone = [answer(any_tiny, [p], settings)[0] for p in prompts]
        assert batched == alone


def test_rows_that_stop_early_keep_their_reply_in_a_batch(any_tiny, zsre_cases):
    """Rows finishing at different steps (as replies that hit a full stop do) leave the others unchanged.

    A finished row is padded when the model has an end-of-sequence token; otherwise it runs on, and
    the reply is what comes before its stop (``_reply`` cuts there).
    """
    texts = [zsre_cases[1].prompt, zsre_cases[2].prompt, "Who?"]
    tok = any_tiny.tokenizer

    def until_done(row: list[int], limit: int) -> str:
        return next((tok.decode(row[:n], skip_special_tokens=True) for n in range(1, len(row) + 1)
                     if len(tok.decode(row[:n], skip_special_tokens=True)) >= limit), "")

    for limit in (3, 7):
        def done(reply: str, limit: int = limit) -> bool:
            return len(reply) >= limit

        batched = [until_done(row, limit) for row in generate_ids(any_tiny, texts, 12, done=done).tolist()]
        alone = [until_done(generate_ids(any_tiny, [t], 12, done=done)[0].tolist(), limit) for t in texts]
        assert batched == alone
        assert sum(len(r) >= limit for r in batched) >= 2


def test_a_chunk_is_answered_in_shared_batches_with_the_same_replies(tiny_llama, zsre_cases, monkeypatch):
    from overtone.evaluation import wild

    cases = zsre_cases[:3]
    evaluator = WildEvaluator(tiny_llama, SHORT)
    alone = [evaluator.before(case, record_from=None) for case in cases]
    monkeypatch.setattr(wild, "MAX_ROWS", 4)  # several generate calls, cutting across cases
    together = evaluator.before_many(cases, record_from=None)
    assert [p.replies for p in together] == [p.replies for p in alone]
    assert sum(len(p.probes) for p in together) > 4

    def wild_fields(fields: dict) -> dict:
        return {k: v for k, v in fields["wild"].items() if k != "eval_s"}

    one_by_one = [wild_fields(evaluator.after(p, replay=False)) for p in alone]
    assert [wild_fields(f) for f in evaluator.after_many(together, [False] * 3)] == one_by_one


def test_locality_compares_the_scored_reply_and_records_the_token_identical_rate_beside_it():
    probes = [WildProbe("rel", "rewrite", "Q?", ("Paris",)), WildProbe("loc", "neighborhood", "Where?", ("Rome",)),
              WildProbe("loc", "neighborhood", "Who?", ("Ada",))]
    before = [Reply("Paris", (1, 2), "Paris"), Reply("Rome", (5, 17), "Rome"), Reply("Ada", (7, 8), "Ada")]
    # probe 2: the same text up to the stop, but the token that holds the stop ("\n\n" against "\n") differs
    # after the stop character; probe 3: another reply
    after = [Reply("Paris", (1, 2), "Paris"), Reply("Rome", (5, 23), "Rome"), Reply("Ada Lovelace", (7, 9), "Ada")]
    pre = WildPreEdit(None, probes, before, 0.0)
    wild = WildEvaluator._fields(pre, after, 0.0)
    loc = [g for g in wild["generations"] if g["metric"] == "loc"]
    assert [(g["kept"], g["tokens_identical"]) for g in loc] == [(1.0, 0.0), (0.0, 0.0)]
    assert wild["post"]["loc"] == 0.5 and wild["loc_tokens"] == {"loc": 0.0}
    assert locality(Reply("the Rome.", (1,), ""), Reply("Rome", (2,), "")) == {"em": 1.0, "tokens": 0.0}
    record = {"case_id": 0, "steps": 1, "edit_s": 0.0, "eval_s": 0.0, "wild": wild}
    summary = summarize([record])["wild"]
    assert summary["loc"] == 50.0 and summary["loc_tokens"] == {"loc": 0.0}
    assert protocol_records([record], "wild")[0]["loc_tokens"] == {"loc": 0.0}


def test_locality_is_kept_while_the_scored_reply_is_the_same(tiny_llama, zsre_cases):
    case = zsre_cases[0]
    evaluator = WildEvaluator(tiny_llama, SHORT)
    pre = evaluator.before(case, record_from=None)
    unchanged = evaluator.after(pre, replay=False)["wild"]
    assert unchanged["post"]["loc"] == 1.0 and unchanged["loc_tokens"] == {"loc": 1.0}
    assert all(g["kept"] == g["tokens_identical"] == 1.0 for g in unchanged["generations"] if g["metric"] == "loc")
    before = state(tiny_llama)
    weight = tiny_llama.adapter.weight("mlp_out", 0)
    with torch.no_grad():
        weight.mul_(-3.0)
    try:
        changed = evaluator.after(pre, replay=False)["wild"]
        loc = [p for p in wild_probes(case) if p.metric == "loc"]
        now = answer(tiny_llama, [p.prompt for p in loc], SHORT)
    finally:
        with torch.no_grad():
            weight.copy_(before["model.layers.0.mlp.down_proj.weight"])
    assert_same_state(tiny_llama, before)
    reference = [r for p, r in zip(pre.probes, pre.replies, strict=True) if p.metric == "loc"]
    pairs = list(zip(now, reference, strict=True))
    expected = [float(normalize_answer(a.text) == normalize_answer(b.text)) for a, b in pairs]
    identical = [float(a.ids == b.ids) for a, b in pairs]
    loc = [g for g in changed["generations"] if g["metric"] == "loc"]
    assert [g["kept"] for g in loc] == expected and [g["tokens_identical"] for g in loc] == identical
    assert changed["post"]["loc"] == sum(expected) / len(expected) < 1.0
    assert changed["loc_tokens"]["loc"] == sum(identical) / len(identical) <= changed["post"]["loc"]


def test_both_protocols_keep_the_teacher_forced_fields_and_add_wild(tiny_llama, zsre_cases):
    cases = zsre_cases[:2]
    before = state(tiny_llama)
    editor = FTM(tiny_llama, FTMConfig(layer=2, lr=0.1, steps=3), CrossEntropy())
    plain = edit_chunk(editor, Evaluator(tiny_llama), cases)
    both = edit_chunk(editor, make_evaluator("teacher-forced", tiny_llama, eval_mode="both", wild=SHORT), cases)
    wild_only = edit_chunk(editor, make_evaluator("teacher-forced", tiny_llama, eval_mode="wild", wild=SHORT), cases)
    assert_same_state(tiny_llama, before)
    for case, p, b, w in zip(cases, plain, both, wild_only, strict=True):
        assert (b["pre"], b["post"], b["detail"]) == (p["pre"], p["post"], p["detail"])
        assert "post" not in w and "pre" not in w
        assert b["wild"]["post"] == w["wild"]["post"] and b["wild"]["generations"] == w["wild"]["generations"]
        assert set(b["wild"]["post"]) == {"rel", "gen", "por", "loc"} and set(b["wild"]["pre"]) == {"rel", "gen", "por"}
        assert b["eval_s"] >= b["wild"]["eval_s"] > 0
        kinds = [(g["metric"], g["kind"]) for g in b["wild"]["generations"]]
        assert kinds == [(probe.metric, probe.kind) for probe in wild_probes(case)]
    summary = summarize(both)
    assert summary["protocols"] == ["teacher-forced", "wild"]
    assert summary["rel"] == summarize(plain)["rel"] and "wild" not in summarize(plain)
    assert summary["wild"]["avg"] == summarize(protocol_records(both, "wild"))["avg"]
    assert summary["wild"]["study_rule"]["replies"] == sum(len([g for g in r["wild"]["generations"]
                                                                if g["metric"] != "loc"]) for r in both)
    only = summarize(wild_only)
    assert only["protocols"] == ["wild"] and only["avg"] is None and only["wild"]["avg"] == summary["wild"]["avg"]


def test_the_configuration_names_the_protocols(tiny_llama):
    assert make_evaluator("teacher-forced", tiny_llama).describe() is None  # older runs resume unchanged
    both = make_evaluator("teacher-forced", tiny_llama, eval_mode="both").describe()
    assert both == {"protocols": ["teacher-forced", "wild"], "wild": {"context": "bare", "max_new_tokens": 50}}
    with pytest.raises(ValueError, match="unknown --eval 'generated'"):
        make_evaluator("teacher-forced", tiny_llama, eval_mode="generated")
    with pytest.raises(ValueError, match="unknown --eval-context 'chat'"):
        WildSettings(context="chat")
