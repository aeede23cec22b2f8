"""Edits as files, for every editor on tiny random models: save / apply / revert round trips, base model
checks, several artifacts in sequence, and export to a folder that plain transformers loads."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from helpers import assert_same_state, state, tiny_model
from peft import PeftModel
from test_memory_editors import SETTINGS as MEMORY_SETTINGS
from test_memory_editors import UNRELATED, logits_of, structure
from test_rome_memit import CASE, FAST, OTHER
from transformers import AutoModelForCausalLM

from overtone.artifacts import (
    ArtifactError,
    EditMismatchError,
    export_model,
    folder_bytes,
    load_edit,
    save_edit,
    tensor_sha256,
)
from overtone.artifacts.manifest import manifest_sha256
from overtone.editors import EditStack, make_editor
from overtone.evaluation import Evaluator
from overtone.models.loading import prepare_model
from overtone.objectives import CrossEntropy, OverTone
from overtone.runner import edit_chunk

# kind -> (editor, settings); the locate editors get their statistics corpus from the fixture
EDITS = {
    "ft-m": ("ft-m", dict(layer=3, steps=5, lr=1e-2)),
    "lora": ("lora", dict(steps=5, lr=1e-2)),  # AdaLoRA, the default variant
    "lora-plain": ("lora", dict(variant="lora", steps=5, lr=1e-2)),
    "rome": ("rome", dict(layer=1, **FAST)),
    "memit": ("memit", dict(layers=(1, 2), **FAST)),
    "wise": ("wise", dict(MEMORY_SETTINGS["wise"], steps=10)),
    "melo": ("melo", dict(MEMORY_SETTINGS["melo"], steps=10)),
}
WEIGHT_EDITS = ["ft-m", "rome", "memit"]
PEFT_EDITS = ["lora", "lora-plain"]
PAIRS = [(CASE.prompt, CASE.target), (OTHER.prompt, OTHER.target), UNRELATED]  # answers in: MELO routes on them
# Export tolerance, absolute on logits: FT-M/ROME/MEMIT export the edited weights bit for bit; LoRA's merge
# adds B @ A into the weights in fp32, which moves logits of these peaked tiny models by ~1e-5.
WEIGHT_TOLERANCE, LORA_TOLERANCE = 1e-6, 1e-4


def make(kind, lm, corpus, objective=None):
    name, settings = EDITS[kind]
    if name in ("rome", "memit"):
        settings = dict(settings, mom2_corpus=corpus)
    return make_editor(name, lm, objective or CrossEntropy(), **settings)


def edit(kind, lm, corpus, objective=None):
    """Two facts: in sequence, or (MEMIT) as one batch. Returns the editor and the stack of its edits."""
    editor, stack = make(kind, lm, corpus, objective), EditStack()
    if kind == "memit":
        stack.push(editor.edit([CASE, OTHER]))
    else:
        for case in (CASE, OTHER):
            stack.push(editor.edit([case]))
    return editor, stack


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def max_difference(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D weights, stored [in, out]
@pytest.mark.parametrize("kind", EDITS)
def test_save_apply_revert_round_trip_is_bit_exact(tokenizer, corpus, tmp_path, kind, arch):
    lm = tiny_model(arch, tokenizer)
    base, shape, base_logits = state(lm), structure(lm), logits_of(lm, PAIRS)
    editor, stack = edit(kind, lm, corpus, OverTone())
    edited = logits_of(lm, PAIRS)
    assert not same(edited, base_logits)
    save_edit(editor, tmp_path / "edit", facts=[CASE, OTHER])
    stack.revert()
    assert_same_state(lm, base)

    artifact = load_edit(tmp_path / "edit")
    assert artifact.editor == EDITS[kind][0] and [c.case_id for c in artifact.facts] == ["t/0", "t/1"]
    handle = artifact.apply(lm)
    assert same(logits_of(lm, PAIRS), edited)  # the edit as it was in memory, bit for bit
    handle.revert()
    assert_same_state(lm, base)
    assert structure(lm) == shape and not hasattr(lm.model, "peft_config")
    assert same(logits_of(lm, PAIRS), base_logits)


@pytest.mark.parametrize("kind", EDITS)
def test_a_model_that_is_not_the_base_is_refused_with_what_differs(tokenizer, corpus, tmp_path, kind):
    lm = tiny_model("llama", tokenizer)
    editor, stack = edit(kind, lm, corpus)
    artifact = save_edit(editor, tmp_path / "edit")
    stack.revert()
    other = tiny_model("llama", tokenizer, seed=1)
    before = state(other)
    touched = next(iter(artifact.manifest["model"]["tensors"]))
    with pytest.raises(EditMismatchError, match=rf"the model tiny-llama differs: {touched}: values differ"):
        artifact.apply(other)
    assert_same_state(other, before)
    with pytest.raises(EditMismatchError, match=r"config model_type: 'qwen2' here, 'llama' in the edit's base"):
        artifact.apply(tiny_model("qwen2", tokenizer))


def test_bf16_ft_m_round_trip_is_bit_exact(tokenizer, corpus, tmp_path):
    lm = tiny_model("llama", tokenizer, dtype=torch.bfloat16)
    base = state(lm)
    editor, stack = edit("ft-m", lm, corpus)
    edited = state(lm)
    artifact = save_edit(editor, tmp_path / "edit")
    (delta,) = artifact.saved.tensors.values()
    assert delta.dtype == torch.float32  # twice the weight's precision: adding it back is exact
    stack.revert()
    handle = load_edit(tmp_path / "edit").apply(lm)
    assert_same_state(lm, edited)
    handle.revert()
    assert_same_state(lm, base)


@pytest.mark.parametrize("kind", WEIGHT_EDITS + PEFT_EDITS)
def test_export_gives_plain_transformers_the_edited_model(tokenizer, corpus, tmp_path, kind):
    lm = tiny_model("llama", tokenizer)
    base = state(lm)
    editor, stack = edit(kind, lm, corpus)
    edited_logits, edited_state = logits_of(lm, PAIRS), state(lm)
    artifact = save_edit(editor, tmp_path / "edit", facts=[CASE, OTHER])
    stack.revert()

    out = export_model(lm, [artifact], tmp_path / "model")
    assert_same_state(lm, base)  # exporting leaves the model it was given as it was
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "overtone_edits.json"} <= {p.name for p in out.iterdir()}
    exported_lm = prepare_model(AutoModelForCausalLM.from_pretrained(out), tokenizer, "exported")
    difference = max_difference(logits_of(exported_lm, PAIRS), edited_logits)
    if kind in PEFT_EDITS:
        assert difference <= LORA_TOLERANCE
    else:
        assert_same_state(exported_lm, edited_state)
        assert difference <= WEIGHT_TOLERANCE
    assert not same(logits_of(exported_lm, PAIRS), logits_of(lm, PAIRS))  # and it is not the base model


@pytest.mark.parametrize("kind", PEFT_EDITS)
def test_peft_loads_the_lora_artifact_folder(tokenizer, corpus, tmp_path, kind):
    lm = tiny_model("llama", tokenizer)
    editor, _ = edit(kind, lm, corpus)
    edited = logits_of(lm, PAIRS)
    artifact = save_edit(editor, tmp_path / "edit")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in artifact.path.iterdir()}
    fresh = tiny_model("llama", tokenizer)
    PeftModel.from_pretrained(fresh.model, str(artifact.path)).eval()
    torch.testing.assert_close(logits_of(fresh, PAIRS), edited, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["wise", "melo"])
def test_routed_edits_are_not_exported(tokenizer, corpus, tmp_path, kind):
    lm = tiny_model("llama", tokenizer)
    editor, _ = edit(kind, lm, corpus)
    artifact = save_edit(editor, tmp_path / "edit")
    with pytest.raises(ArtifactError, match=rf"route each sequence.*overtone generate --edit {artifact.path}"):
        export_model(lm, [artifact], tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_several_artifacts_apply_in_sequence_and_revert_newest_first(tokenizer, corpus, tmp_path):
    lm = tiny_model("llama", tokenizer)
    base, shape = state(lm), structure(lm)
    kinds = ["rome", "wise", "ft-m", "lora"]  # layer 1 mlp_out, layer 2 mlp_out (side memory), layer 3 mlp_out, q/v
    in_memory = []
    for kind in kinds:  # each edit made on the model with the earlier ones applied, then saved
        editor, stack = edit(kind, lm, corpus)
        save_edit(editor, tmp_path / kind)
        in_memory.append(stack)
    combined = logits_of(lm, PAIRS)
    for stack in reversed(in_memory):
        stack.revert()
    assert_same_state(lm, base)

    applied = EditStack()
    for kind in kinds:
        applied.push(load_edit(tmp_path / kind).apply(lm))
    assert same(logits_of(lm, PAIRS), combined)
    with pytest.raises(ValueError, match="already carries peft adapters"):
        load_edit(tmp_path / "lora").apply(lm)  # one peft-based edit at a time
    applied.revert()
    assert_same_state(lm, base)
    assert structure(lm) == shape


def test_an_edit_made_on_top_of_another_applies_only_after_it(tokenizer, corpus, tmp_path):
    lm = tiny_model("llama", tokenizer)
    base = state(lm)
    first = make("ft-m", lm, corpus)
    stack = EditStack()
    stack.push(first.edit([CASE]))
    save_edit(first, tmp_path / "first")
    second = make("ft-m", lm, corpus)  # a new editor: its base is the model with the first edit
    stack.push(second.edit([OTHER]))
    save_edit(second, tmp_path / "second")
    both = logits_of(lm, PAIRS)
    stack.revert()

    with pytest.raises(EditMismatchError, match="values differ"):
        load_edit(tmp_path / "second").apply(lm)
    applied = EditStack()
    for name in ("first", "second"):
        applied.push(load_edit(tmp_path / name).apply(lm))
    assert same(logits_of(lm, PAIRS), both)
    applied.revert()
    assert_same_state(lm, base)


def test_manifest_describes_the_edit_and_the_folder_is_small(tokenizer, corpus, tmp_path):
    lm = tiny_model("llama", tokenizer)
    editor = make("ft-m", lm, corpus, OverTone())
    stack = EditStack()
    records = edit_chunk(editor, Evaluator(lm), [CASE, OTHER], keep=stack)
    assert len(stack.handles) == 1  # the edits stayed applied (one weight copy for the sequence)
    artifact = save_edit(editor, tmp_path / "edit", facts=[CASE, OTHER], metrics={"cases": records},
                         protocol={"order": "sequence"})
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    assert manifest["format"] == "overtone-edit" and manifest["format_version"] == 2
    assert manifest["overtone_version"] == __import__("overtone").__version__
    model = manifest["model"]
    assert model["name"] == "tiny-llama" and model["config"]["hidden_size"] == 32 and len(model["config_sha256"]) == 64
    (name, record), = model["tensors"].items()
    assert name == "model.layers.3.mlp.down_proj.weight" and record["shape"] == [32, 64]
    assert manifest["editor"]["name"] == "ft-m" and manifest["editor"]["layer"] == 3
    assert manifest["objective"]["name"] == "overtone" and manifest["objective"]["lam"] == 0.1
    assert [f["id"] for f in manifest["facts"]] == ["t/0", "t/1"] and manifest["facts"][0]["subject"] == CASE.subject
    assert manifest["metrics"]["cases"][0]["post"]["rel"] == records[0]["post"]["rel"]
    (delta_name, delta), = manifest["edit"]["tensors"].items()
    assert delta_name == name and delta["shape"] == [32, 64] and delta["dtype"] == "float64"
    assert delta["sha256"] == tensor_sha256(artifact.saved.tensors[name])
    file = artifact.path / "edit.safetensors"
    assert manifest["files"] == {"edit.safetensors": {"sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
                                                      "bytes": file.stat().st_size}}
    assert manifest["manifest_sha256"] == manifest_sha256(manifest)
    model_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    assert folder_bytes(artifact.path) < model_bytes / 5  # the changed matrix only, never the model
    stack.revert()


def test_saving_without_live_edits_and_unreadable_folders_are_clear_errors(tokenizer, corpus, tmp_path):
    lm = tiny_model("llama", tokenizer)
    editor, stack = edit("ft-m", lm, corpus)
    stack.revert()
    with pytest.raises(ArtifactError, match="holds no live edits"):
        save_edit(editor, tmp_path / "none")
    editor.edit([CASE])
    artifact = save_edit(editor, tmp_path / "edit")
    with pytest.raises(ArtifactError, match="already exists and is not an empty folder"):
        save_edit(editor, artifact.path)
    with pytest.raises(ArtifactError, match="not an edit artifact"):
        load_edit(tmp_path)
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    (artifact.path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 9}))
    with pytest.raises(ArtifactError, match=r"field format_version: format version 9, written by overtone .* reads "
                                            r"version 2"):
        load_edit(artifact.path)
