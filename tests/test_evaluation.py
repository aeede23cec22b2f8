"""Answer-token location and the teacher-forced metrics."""

from __future__ import annotations

import pytest
import torch

from overtone.benchmarks import EditCase, Probe
from overtone.evaluation import Evaluator
from overtone.objectives import IGNORE_INDEX
from overtone.tokens import encode_pairs


def test_answer_tokens_are_the_tokens_after_the_prompt(tokenizer):
    batch = encode_pairs(tokenizer, ["The capital of Italy is", "Who wrote it?"], ["Rome", "Mary Shelley"])
    for i, (prompt, answer) in enumerate([("The capital of Italy is", "Rome"), ("Who wrote it?", "Mary Shelley")]):
        n = int(batch.label_mask[i].sum())
        ids = batch.input_ids[i, : int(batch.attention_mask[i].sum())].tolist()
        assert tokenizer.decode(ids[-n:]) == " " + answer
        assert tokenizer.decode(ids[:-n]) == prompt
        # each label is the token right after the position that predicts it
        for j in range(n):
            assert batch.labels[i, j] == batch.input_ids[i, batch.positions[i, j] + 1]
    assert batch.labels[0].eq(IGNORE_INDEX).any()  # shorter answer is padded
    assert batch.attention_mask[:, 0].all()  # right padding: every row starts at position 0


def test_empty_answer_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="empty answer for prompt 'Q'"):
        encode_pairs(tokenizer, ["Q"], ["  "])


def make_case() -> EditCase:
    return EditCase(
        case_id="t/0",
        prompt="Which family does Epaspidoceras belong to?",
        target="Noctuidae",
        rephrases=("What family are Epaspidoceras?",),
        portability={"Reasoning": (Probe("What is the common name for the family?", "Owlet moths"),),
                     "Subject_Aliasing": (Probe("Which family is Epaspidoceras in?", "Noctuidae"),
                                          Probe("Epaspidoceras is a genus in", "Noctuidae family"))},
        locality={"Relation_Specificity": (Probe("The taxon rank of Epaspidoceras is", "genus"),)},
    )


def manual_accuracy(lm, prompt: str, answer: str) -> float:
    """Token accuracy computed the plain way: one unbatched forward through the HF model."""
    batch = encode_pairs(lm.tokenizer, [prompt], [answer])
    with torch.no_grad():
        logits = lm.model(batch.input_ids).logits[0]
    pred = logits[batch.positions[0]].argmax(-1)
    return pred.eq(batch.labels[0]).float().mean().item()


def test_batched_scores_equal_unbatched_token_accuracy(any_tiny):
    case = make_case()
    ev = Evaluator(any_tiny)
    probes = ev.probes(case)
    assert [g for g, _ in probes.groups] == ["rel", "gen", "por", "por", "por", "loc"]
    pre = ev.predict(probes)
    scores = ev.score(probes, pre, reference=None)
    assert scores.rel == pytest.approx(manual_accuracy(any_tiny, case.prompt, case.target), abs=1e-6)
    assert scores.gen == pytest.approx(manual_accuracy(any_tiny, case.rephrases[0], case.target), abs=1e-6)
    reasoning = manual_accuracy(any_tiny, "What is the common name for the family?", "Owlet moths")
    aliasing = (manual_accuracy(any_tiny, "Which family is Epaspidoceras in?", "Noctuidae")
                + manual_accuracy(any_tiny, "Epaspidoceras is a genus in", "Noctuidae family")) / 2
    # per kind first, then over kinds
    assert scores.por == pytest.approx((reasoning + aliasing) / 2, abs=1e-6)
    assert scores.detail["por"]["Subject_Aliasing"] == pytest.approx(aliasing, abs=1e-6)
    assert scores.loc is None  # no reference: locality is undefined before editing


def test_locality_is_agreement_with_the_unedited_predictions(tiny_llama):
    ev = Evaluator(tiny_llama)
    probes = ev.probes(make_case())
    pre = ev.predict(probes)
    assert ev.score(probes, pre, reference=pre).loc == 1.0
    with torch.no_grad():
        for p in tiny_llama.model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    post = ev.predict(probes)
    loc_row = probes.groups.index(("loc", "Relation_Specificity"))
    expected = post.tokens[loc_row].eq(pre.tokens[loc_row]).float().mean().item()
    assert ev.score(probes, post, reference=pre).loc == pytest.approx(expected)


def test_probe_errors_name_the_case(tiny_llama):
    case = EditCase(case_id="zsre/7", prompt="p", target="t",
                    locality={"Relation_Specificity": (Probe("q", " "),)})
    with pytest.raises(ValueError, match="case zsre/7: empty answer"):
        Evaluator(tiny_llama).probes(case)
