"""ROME and MEMIT on the real embedded model (slow): the edit shows in greedy completions and reverts exactly."""

from __future__ import annotations

import pytest
from helpers import assert_same_state, state

from overtone import EditCase, greedy_complete, make_editor
from overtone.objectives import CrossEntropy, OverTone

pytestmark = pytest.mark.slow

EIFFEL = EditCase("eiffel", "The Eiffel Tower is located in the city of", "Rome", subject="The Eiffel Tower")
LOUVRE = EditCase("louvre", "The Louvre museum is located in the city of", "Berlin", subject="The Louvre museum")
JAPAN = "The capital of Japan is"
# a few thousand tokens of the packaged Wikipedia: enough for an invertible C, seconds to compute
SMALL_STATS = {"mom2_samples": 12, "mom2_max_tokens": 512}


def test_rome_moves_the_fact_and_keeps_an_unrelated_one(smollm):
    before = state(smollm)
    japan = greedy_complete(smollm, [JAPAN], 3)
    editor = make_editor("rome", smollm, OverTone(), **SMALL_STATS)
    handle = editor.edit([EIFFEL])
    after, japan_after = greedy_complete(smollm, [EIFFEL.prompt, JAPAN], 3)
    assert after.strip().startswith("Rome") and japan_after == japan[0]
    handle.revert()
    assert_same_state(smollm, before)


def test_memit_edits_two_facts_in_one_batch(smollm):
    before = state(smollm)
    editor = make_editor("memit", smollm, CrossEntropy(), **SMALL_STATS)
    handle = editor.edit([EIFFEL, LOUVRE])
    eiffel, louvre = greedy_complete(smollm, [EIFFEL.prompt, LOUVRE.prompt], 3)
    assert eiffel.strip().startswith("Rome") and louvre.strip().startswith("Berlin")
    handle.revert()
    assert_same_state(smollm, before)
