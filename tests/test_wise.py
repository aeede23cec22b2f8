"""WISE specifics: masked and clamped side memory, learnt thresholds, shards and TIES merging."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from test_memory_editors import CASE, SETTINGS, routed

from overtone.benchmarks import DatasetError, EditCase
from overtone.benchmarks.irrelevant import load_irrelevant
from overtone.editors import WISE, EditStack, WISEConfig, make_editor
from overtone.editors.presets import editor_presets, matching_preset, model_shapes
from overtone.editors.wise import ties_merge
from overtone.objectives import CrossEntropy


def wise(lm, **overrides) -> WISE:
    return make_editor("wise", lm, CrossEntropy(), **{**SETTINGS["wise"], **overrides})


def test_only_the_shard_mask_changes_and_the_clamp_holds(tiny_llama):
    ed = wise(tiny_llama, mask_ratio=0.2, weight_decay=0.0, norm_constraint=0.05, steps=10)
    original = ed.module.weight.detach().clone()
    ed.edit([CASE])
    shard = ed.state.shards[-1]
    delta = shard.weight - original
    assert shard.mask is not None and 0.1 < shard.mask.float().mean().item() < 0.3
    assert bool(delta[~shard.mask].eq(0).all()) and bool(delta[shard.mask].ne(0).any())
    assert delta.abs().max().item() <= 0.05 + 1e-6
    assert torch.equal(ed.module.weight, original)  # the model's own matrix never changes


def test_a_sequence_in_an_edit_stack_holds_one_snapshot_of_the_side_memory(tiny_llama, zsre_cases):
    ed, stack = wise(tiny_llama, steps=2), EditStack()
    stack.push(ed.edit([zsre_cases[0]]))
    after_first = weakref.ref(ed.state.shards[-1].weight)
    stack.push(ed.edit([zsre_cases[1]]))  # its handle's snapshot (the first edit's memory) is dropped at once
    gc.collect()
    assert after_first() is None
    stack.revert()
    assert not ed.state.shards and not ed._hooks


def edit_distance(ed, case) -> float:
    """The activation distance of the edit's own text under the open shard."""
    inner, real = ed._inner_inputs([f"{case.prompt} {case.target}"])
    original = ed.module.weight.detach().float()
    shard = ed.state.shards[-1]
    return ed._distance(ed._project(inner, shard.weight), ed._project(inner, original), real).item()


def test_threshold_is_the_smallest_edit_distance_scaled(tiny_llama, zsre_cases):
    ed = wise(tiny_llama, threshold_scale=0.5)
    ed.edit([zsre_cases[0]])
    first = edit_distance(ed, zsre_cases[0])
    assert ed.state.shards[0].min_act == pytest.approx(first, rel=1e-4)
    ed.edit([zsre_cases[1]])
    second = edit_distance(ed, zsre_cases[1])
    shard = ed.state.shards[0]
    assert shard.edits == 2 and shard.min_act == pytest.approx(min(first, second), rel=1e-4)
    assert ed._threshold(shard) == pytest.approx(shard.min_act * 0.88 * 0.5)
    strict = wise(tiny_llama, threshold_scale=1e6)  # nothing passes: every row keeps the original output
    strict.edit([CASE])
    tiny_llama.model(**tiny_llama.tokenizer(CASE.prompt + " " + CASE.target, return_tensors="pt"))
    assert routed(strict) == [False]


def test_shards_close_every_save_freq_and_merge_every_merge_freq(tiny_llama, zsre_cases):
    ed = wise(tiny_llama, save_freq=1, merge_freq=2, mask_ratio=0.2)
    ed.edit([zsre_cases[0]])
    first = ed.state.shards[0]
    assert len(ed.state.shards) == 1 and first.closed and first.mask is None and ed.state.unmerged == 1
    ed.edit([zsre_cases[1]])
    (merged,) = ed.state.shards
    assert merged.closed and merged.edits == 2 and merged.min_act <= first.min_act
    assert ed.state.opened == 2 and ed.state.unmerged == 0
    ed.edit([zsre_cases[2]])
    assert [s.edits for s in ed.state.shards] == [2, 1] and ed.state.opened == 3
    # routing retrieves across memories: every edited fact still reaches one of them
    for case in zsre_cases[:3]:
        tiny_llama.model(**tiny_llama.tokenizer(f"{case.prompt} {case.target}", return_tensors="pt"))
        assert ed.last_routes.tolist()[0] in (0, 1)


def test_ties_merge_trims_elects_signs_and_averages_the_agreeing_deltas():
    base = torch.zeros(4)
    a = torch.tensor([4.0, -3.0, 0.1, 2.0])
    b = torch.tensor([2.0, 1.0, -0.2, -5.0])
    merged = ties_merge(base, [a, b], density=0.5)  # keeps the 2 largest of each: a -> [4,-3,0,0], b -> [2,0,0,-5]
    assert merged.tolist() == [3.0, -3.0, 0.0, -5.0]
    assert torch.equal(ties_merge(base + 1, [a + 1], density=1.0), a + 1)


def test_irrelevant_sentences_come_from_the_zsre_train_split(tiny_llama, tmp_path):
    sentences = load_irrelevant()
    assert len(sentences) == 998  # the 1000 train records less the 2 with an empty target, as the loader skips
    assert sentences[0] == "nq question: john goodman's character in the big lebowski Walter Sobchak"
    ed = wise(tiny_llama)
    picked = ed._irrelevant_for([CASE, EditCase("t/1", "Q?", "A")])
    assert all(s in sentences for s in picked) and picked == ed._irrelevant_for([CASE, EditCase("t/1", "Q?", "A")])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"src": "Who?", "alt": "Bob", "loc": "nq question: who?", "loc_ans": ""}]))
    with pytest.raises(DatasetError, match="record 1: field 'loc_ans': is empty"):
        wise(tiny_llama, irrelevant=str(bad))
    none = tmp_path / "none.json"
    none.write_text(json.dumps([{"src": "Who?", "alt": "Bob"}]))
    with pytest.raises(DatasetError, match="no locality probes"):
        wise(tiny_llama, irrelevant=str(none))


def test_presets_and_validation(tiny_llama):
    ed = make_editor("wise", tiny_llama, CrossEntropy(), preset="llama-3-8b", layer=1)
    assert ed.config.layer == 1 and ed.config.lr == 0.9 and ed.config.steps == 30  # explicit fields win
    # a model of no preset's shape gets no borrowed preset: its activation scale may differ
    with pytest.raises(ValueError, match=r"WISE has no preset for model 'tiny-llama'; choose one with --set preset="):
        make_editor("wise", tiny_llama, CrossEntropy())
    given = dict(lr=1.0, steps=3, alpha=1.0, beta=2.0, gamma=1.0, act_ratio=0.5)
    assert make_editor("wise", tiny_llama, CrossEntropy(), **given).config.layer == 3  # 27/32 of 4 layers
    with pytest.raises(ValueError, match="unknown preset 'gpt-5'"):
        make_editor("wise", tiny_llama, CrossEntropy(), preset="gpt-5")
    with pytest.raises(ValueError, match=r"merge_freq .* multiple of save_freq"):
        WISEConfig(save_freq=3, merge_freq=4)
    with pytest.raises(ValueError, match="out of range"):
        make_editor("wise", tiny_llama, CrossEntropy(), layer=4, **given)


def test_presets_match_the_model_shape_not_its_name(tokenizer):
    """A Llama-3-8B-shaped model gets the llama-3-8b preset whatever it is called (e.g. an Instruct hub id)."""
    from overtone.models.loading import LoadedModel

    class Shaped:  # only the config is read
        def __init__(self, **shape):
            self.model = type("M", (), {"config": type("C", (), shape)()})()
            self.name = "meta-llama/Meta-Llama-3-8B-Instruct"

    presets = editor_presets("wise", WISEConfig).settings()
    lm: LoadedModel = Shaped(**model_shapes()["llama-3-8b"])  # type: ignore[assignment]
    assert matching_preset(lm, presets) == "llama-3-8b"
    other = Shaped(**{**model_shapes()["llama-3-8b"], "num_hidden_layers": 80})
    assert matching_preset(other, presets) is None
