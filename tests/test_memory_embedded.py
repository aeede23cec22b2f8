"""WISE and MELO on the real embedded model with its presets: marked slow."""

from __future__ import annotations

import pytest
from helpers import assert_same_state, state

from overtone import Evaluator, edit_and_score, load_benchmark, make_editor
from overtone.objectives import CrossEntropy

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["wise", "melo"])
def test_preset_edit_is_reliable_local_and_reverts(smollm, name):
    before = state(smollm)
    editor = make_editor(name, smollm, CrossEntropy())
    assert editor.config.preset == "smollm2-135m"
    record = edit_and_score(editor, Evaluator(smollm), load_benchmark("zsre", limit=1)[0])
    assert record["post"]["rel"] == 1.0 and record["pre"]["rel"] < 1.0
    assert record["post"]["loc"] >= 0.5
    assert_same_state(smollm, before)
    assert not hasattr(smollm.model, "peft_config")
