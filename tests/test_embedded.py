"""The real embedded model (SmolLM2-135M-Instruct): marked slow, run by .ci/run after the fast suite."""

from __future__ import annotations

import pytest
from helpers import assert_same_state, state

from overtone import EditCase, Evaluator, edit_and_score, greedy_complete, load_benchmark, make_editor
from overtone.models import embedded
from overtone.objectives import CrossEntropy, OverTone

pytestmark = pytest.mark.slow

EIFFEL = "The Eiffel Tower is located in the city of"
JAPAN = "The capital of Japan is"


def test_cache_is_keyed_by_the_gguf_hash(smollm):
    folder, sha = embedded.checkpoint_dir("smollm2-135m")
    assert folder.name == f"smollm2-135m-{sha[:16]}" and (folder / "model.safetensors").is_file()
    assert smollm.identity["gguf_sha256"] == sha
    assert smollm.adapter.model_type == "llama" and smollm.adapter.num_layers == 30


@pytest.mark.parametrize("objective", [CrossEntropy(), OverTone()], ids=["ce", "overtone"])
def test_edit_changes_the_answer_and_keeps_unrelated_ones(smollm, objective):
    before_state = state(smollm)
    before = greedy_complete(smollm, [EIFFEL, JAPAN], 4)
    assert before[0].strip().startswith("Paris") and before[1].strip().startswith("Tokyo")
    handle = make_editor("ft-m", smollm, objective).edit([EditCase("eiffel", EIFFEL, "Rome")])
    after = greedy_complete(smollm, [EIFFEL, JAPAN], 4)
    assert after[0].strip().startswith("Rome"), after
    assert after[1] == before[1]
    handle.revert()
    assert_same_state(smollm, before_state)
    assert greedy_complete(smollm, [EIFFEL], 4) == before[:1]


def test_zsre_case_reaches_full_reliability(smollm):
    case = load_benchmark("zsre", limit=1)[0]
    record = edit_and_score(make_editor("ft-m", smollm, CrossEntropy()), Evaluator(smollm), case)
    assert record["post"]["rel"] == 1.0 and record["pre"]["rel"] < 1.0
    assert record["post"]["loc"] > 0.5
