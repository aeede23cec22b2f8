"""MELO specifics: the key codebook (new cluster, growth, conflict split), per-edit peft adapters."""

from __future__ import annotations

import pytest
import torch
from test_memory_editors import CASE, SETTINGS

from overtone.benchmarks import EditCase
from overtone.editors import MELO, make_editor
from overtone.editors.melo import Codebook
from overtone.objectives import CrossEntropy


def melo(lm, **overrides) -> MELO:
    return make_editor("melo", lm, CrossEntropy(), **{**SETTINGS["melo"], **overrides})


def key(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def test_codebook_creates_grows_and_splits_clusters():
    book = Codebook(init_radius=1.0)
    assert book.route(key(0.0, 0.0)[None]) == [None]
    assert book.add(key(0.0, 0.0), "Paris", "e1") == "new"
    assert book.add(key(5.0, 0.0), "Rome", "e2") == "new"  # farther than radius + init_radius = 2
    assert book.add(key(1.5, 0.0), "Paris", "e3") == "joined"  # near, same label: the cluster grows
    grown = book.clusters[0]
    assert grown.center.tolist() == [0.75, 0.0] and grown.radius == pytest.approx(1.0)  # max(0.75, init)
    assert grown.blocks == ("e1", "e3")
    assert book.route(torch.stack([key(0.1, 0.0), key(1.6, 0.0), key(3.0, 3.0)])) == ["e1", "e3", None]
    assert book.add(key(6.0, 0.0), "Berlin", "e4") == "split"  # near Rome's cluster, another label
    rome, berlin = book.clusters[1], book.clusters[2]
    assert rome.radius == pytest.approx(0.5 - 1e-5) and berlin.radius == pytest.approx(0.5 + 1e-5)
    assert book.route(torch.stack([key(5.2, 0.0), key(5.8, 0.0), key(5.5, 2.0)])) == ["e2", "e4", None]


def test_a_split_drops_the_keys_outside_the_shrunken_radius():
    book = Codebook(init_radius=2.0)
    book.add(key(0.0), "A", "e1")
    book.add(key(2.0), "A", "e2")  # joins: centre 1, radius max(1, 2) = 2
    assert book.add(key(2.5), "B", "e3") == "split"  # distance 1.5 to the centre: radius 0.75 keeps no key
    emptied = book.clusters[0]
    assert emptied.blocks == (None,) and emptied.radius == pytest.approx(0.75 - 1e-5)
    assert book.route(key(1.0)[None]) == [None]


def test_each_edit_gets_its_own_peft_adapter_and_only_it_trains(tiny_llama, zsre_cases):
    ed = melo(tiny_llama)
    ed.edit([zsre_cases[0]])
    layer = tiny_llama.model.get_submodule(ed.targets[0])
    assert type(layer).__name__ == "Linear" and "edit1" in layer.lora_A
    first = {k: v.detach().clone() for k, v in layer.state_dict().items() if "edit1" in k}
    ed.edit([zsre_cases[1]])
    assert set(layer.lora_A) == {"edit1", "edit2"} and ed.adapters == ("edit1", "edit2")
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in first.items())
    assert layer.lora_A["edit2"].weight.dtype == torch.float32 and layer.lora_A["edit2"].weight.shape[0] == 2


def test_conflicting_targets_split_and_both_edits_stay_reachable(tiny_llama):
    ed = melo(tiny_llama, init_radius=1e6)  # every key is near: a second label must split
    prompt = "Which family does Epaspidoceras belong to?"
    ed.edit([EditCase("t/0", prompt, "Noctuidae")])
    ed.edit([EditCase("t/1", prompt, "Pieridae")])
    assert len(ed.codebook.clusters) == 2
    radii = [c.radius for c in ed.codebook.clusters]
    assert radii[0] < radii[1] < 1e6
    for target, block in (("Noctuidae", "edit1"), ("Pieridae", "edit2")):
        tiny_llama.model(**tiny_llama.tokenizer(f"{prompt} {target}", return_tensors="pt"))
        assert ed.last_routes == [block]


def test_keys_come_from_below_the_lora_layers(tiny_llama):
    ed = melo(tiny_llama, layers=(2, 3), key_layer=1)
    assert ed.first_layer == 1 and ed.edit([CASE]).first_layer == 1
    with pytest.raises(ValueError, match="key_layer 3 must not be above the lowest LoRA layer 2"):
        melo(tiny_llama, layers=(2, 3), key_layer=3)


def test_presets_and_a_missing_radius(tiny_llama):
    ed = make_editor("melo", tiny_llama, CrossEntropy(), preset="llama-3-8b", layers=(2, 3))
    assert ed.config.init_radius == 30.0 and ed.config.key_layer == 2 and ed.config.lr == 1e-3
    with pytest.raises(ValueError, match=r"set init_radius .*benchmarks/melo_key_distances.py"):
        make_editor("melo", tiny_llama, CrossEntropy())
    generic = make_editor("melo", tiny_llama, CrossEntropy(), init_radius=3.0)
    assert generic.config.layers == (2, 3) and generic.config.rank == 2  # depth 3/4, the reference's values
    with pytest.raises(ValueError, match="role 'attn_qkv' does not exist"):
        melo(tiny_llama, roles=("attn_qkv",))
