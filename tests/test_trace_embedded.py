"""Token-level traces on the real embedded model (SmolLM2-135M-Instruct): marked slow."""

from __future__ import annotations

import pytest
import torch

from overtone import Evaluator, load_benchmark, make_editor
from overtone.diagnostics import trace_edit
from overtone.objectives import CrossEntropy

pytestmark = pytest.mark.slow


def test_zsre_trace_greedy_tokens_and_ud_on_the_real_model(smollm):
    lm = smollm
    case = load_benchmark("zsre", limit=1)[0]  # Epaspidoceras -> Noctuidae: ' No' 'ct' 'uid' 'ae'
    (trace,) = trace_edit(make_editor("ft-m", lm, CrossEntropy(), steps=4), Evaluator(lm), [case])
    ids = lm.tokenizer(case.prompt, return_tensors="pt")["input_ids"]
    first = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                              pad_token_id=lm.tokenizer.pad_token_id)[0, -1].item()
    assert trace.greedy_ids[0] == first
    fitted = [g == y for g, y in zip(trace.greedy_ids, trace.label_ids, strict=True)]
    assert fitted == [False, False, True, True]  # the model completes 'Noct' -> 'uidae' by itself
    assert all((u == 0) if f else (u > 0) for u, f in zip(trace.ud[0], fitted, strict=True))
    # heterogeneous token overfitting: the initially fitted tokens go below zero first
    assert trace.ud[-1][2] < 0 and trace.ud[-1][3] < 0 and trace.ud[-1][1] > 0
