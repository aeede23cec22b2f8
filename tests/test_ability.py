"""General ability during continual editing: the held-out slice, perplexity, general facts, chunk ends."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_same_state, state

from overtone.corpus import load_corpus
from overtone.editors import FTM, FTMConfig
from overtone.evaluation import Evaluator, WildSettings
from overtone.evaluation.ability import AbilityMonitor, AbilitySettings, Fact, load_facts
from overtone.evaluation.wild import answer, normalize_answer
from overtone.objectives import CrossEntropy
from overtone.runner import edit_chunk, summarize


def test_the_held_out_slice_is_disjoint_from_the_statistics_documents():
    corpus = load_corpus("wikipedia")
    statistics, held_out = corpus.statistics_documents(), corpus.held_out_documents()
    documents = corpus.documents()
    assert len(held_out) == 64 and len(statistics) == len(documents) - 64 and not set(held_out) & set(statistics)
    assert held_out == documents[35::36][:64]  # every 36th article: the slice spans the corpus
    assert held_out[0].startswith("Komae Station")


def test_the_shipped_facts_have_answers_and_sources():
    facts = load_facts()
    assert len(facts) == 35 and all(f.prompt and f.answers[0] for f in facts)
    assert all(normalize_answer(a) not in normalize_answer(f.prompt).split() for f in facts for a in f.answers[1:])


def monitor_for(lm, n_samples: int = 3) -> AbilityMonitor:
    """A monitor on the real held-out slice (first documents only, for speed) and facts the model itself states."""
    prompts = ["The capital of France is", "Who wrote Hamlet?", "Epaspidoceras belongs to", "The river"]
    replies = answer(lm, prompts, WildSettings(max_new_tokens=16))
    facts = [Fact(p, (normalize_answer(r.text).split()[0],)) for p, r in zip(prompts, replies, strict=True)
             if normalize_answer(r.text)]
    monitor = AbilityMonitor(lm, facts=facts)
    monitor.samples = monitor.samples[:n_samples]
    return monitor


def test_perplexity_is_the_plain_token_weighted_estimate(tiny_llama):
    monitor = monitor_for(tiny_llama)
    nll, count = 0.0, 0
    with torch.no_grad():
        for sample in monitor.samples:
            ids = torch.tensor([sample])
            nll += tiny_llama.model(input_ids=ids, labels=ids).loss.item() * (len(sample) - 1)
            count += len(sample) - 1
    assert monitor.perplexity() == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert monitor.describe()["tokens"] == sum(map(len, monitor.samples))


def test_measure_compares_with_the_unedited_model(tiny_llama):
    monitor = monitor_for(tiny_llama)
    reference = monitor.measure_reference()
    assert len(reference["known"]) == len(monitor.facts) > 0  # the facts are the model's own answers
    same = monitor.measure()
    assert same["ppl"] == pytest.approx(same["ppl_unedited"]) and same["facts_right"] == same["facts_same"] == 1.0
    before = state(tiny_llama)
    with torch.no_grad():
        tiny_llama.adapter.weight("mlp_out", 0).mul_(-3.0)
    changed = monitor.measure()
    with torch.no_grad():
        tiny_llama.adapter.weight("mlp_out", 0).copy_(before["model.layers.0.mlp.down_proj.weight"])
    assert changed["ppl"] != pytest.approx(changed["ppl_unedited"])
    assert changed["facts_same"] < 1.0 and changed["ppl_unedited"] == same["ppl_unedited"]
    assert monitor.measure_reference() is reference  # measured once per run


def test_a_chunk_measures_its_ability_with_every_edit_applied(tiny_llama, zsre_cases):
    monitor = monitor_for(tiny_llama)
    before = state(tiny_llama)
    unedited = monitor.perplexity()
    editor = FTM(tiny_llama, FTMConfig(layer=1, lr=0.5, steps=4), CrossEntropy())
    records = edit_chunk(editor, Evaluator(tiny_llama), zsre_cases[:3], ability=monitor)
    assert_same_state(tiny_llama, before)
    measured = [r["ability"] for r in records]
    assert measured[0] == measured[1] == measured[2]
    assert measured[0]["ppl_unedited"] == pytest.approx(unedited) and measured[0]["ppl"] != pytest.approx(unedited)
    for i, r in enumerate(records):
        r["chunk"] = 0 if i < 2 else 1  # as run_continual numbers them; two chunks of ability values
    records[2] = {**records[2], "ability": {**measured[0], "ppl": 2 * measured[0]["ppl_unedited"],
                                            "facts_right": 0.0}}
    summary = summarize(records)["ability"]
    assert summary["n_measured"] == 2 and summary["facts"] == len(monitor.facts)
    drift = ((measured[0]["ppl"] / measured[0]["ppl_unedited"] - 1) + 1.0) / 2
    assert summary["ppl_drift_pct"] == pytest.approx(100 * drift, abs=0.01)
    assert summary["facts_right"] == pytest.approx(100 * (measured[0]["facts_right"] + 0.0) / 2, abs=0.01)


def test_ability_every_k_edits_draws_the_drift_curve_of_a_chunk(tiny_llama, zsre_cases):
    monitor = monitor_for(tiny_llama, n_samples=2)
    monitor.settings = AbilitySettings(every=2)
    editor = FTM(tiny_llama, FTMConfig(layer=1, lr=0.5, steps=3), CrossEntropy())
    records = edit_chunk(editor, Evaluator(tiny_llama), zsre_cases[:5], ability=monitor)
    curve = records[0]["ability_curve"]
    assert [p["edits"] for p in curve] == [2, 4, 5] and all(r["ability_curve"] == curve for r in records)
    assert {k: v for k, v in curve[-1].items() if k != "edits"} == records[0]["ability"]  # the end, measured once
    assert curve[0]["ppl"] != pytest.approx(curve[-1]["ppl"])  # measured with 2 edits applied, not 5
    for r in records:
        r["chunk"] = 0  # as run_continual numbers them: one chunk
    summary = summarize(records)["ability"]
    assert [p["edits"] for p in summary["curve"]] == [2, 4, 5] and summary["curve"][-1]["n_measured"] == 1
    assert summary["curve"][-1]["ppl_drift_pct"] == summary["ppl_drift_pct"]
    assert "every" in monitor.describe() and "every" not in AbilityMonitor(tiny_llama).describe()


def test_a_batch_edit_that_steps_over_a_multiple_of_k_is_measured_after_it():
    monitor = AbilityMonitor.__new__(AbilityMonitor)
    monitor.settings = AbilitySettings(every=2)
    assert [after for before, after in ((0, 3), (3, 6), (6, 7)) if monitor.due(before, after, 7)] == [3, 6]
    assert not monitor.due(6, 8, 8)  # the chunk's end is measured anyway
    with pytest.raises(ValueError, match="every >= 0"):
        AbilitySettings(every=-1)
