"""Edits as files, for every editor on tiny random models: save / apply / revert round trips, base model
checks, several artifacts in sequence, and export to a folder that plain transformers loads."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace

import pytest
import torch
from helpers import assert_same_state, state, tiny_model
from peft import PeftModel
from safetensors.torch import save_file
from test_memory_editors import SETTINGS as MEMORY_SETTINGS
from test_memory_editors import UNRELATED, logits_of, structure
from test_rome_memit import CASE, FAST, OTHER
from transformers import AutoModelForCausalLM

from overtone.artifacts import (
    ArtifactError,
    BaseChoice,
    EditMismatchError,
    choose_base,
    export_model,
    folder_bytes,
    load_edit,
    save_edit,
    tensor_sha256,
)
from overtone.artifacts.identity import tensor_record
from overtone.artifacts.manifest import manifest_sha256, sealed
from overtone.editors import FTM, EditStack, FTMConfig, make_editor
from overtone.editors.base import SavedEdit
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
    with pytest.raises(EditMismatchError, match=rf"manifest.json: field model: the edit was made on tiny-llama; the "
                                                rf"model tiny-llama differs: {touched}: values differ"):
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


# ---- verification: every file, tensor and field checked before any model is loaded -------------------------


def reseal(folder) -> None:
    """Record the folder's files as they are now and seal the manifest again: a consistent crafted artifact."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"] = {name: {"sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest(),
                                "bytes": (folder / name).stat().st_size} for name in manifest["files"]}
    path.write_text(json.dumps(sealed({k: v for k, v in manifest.items() if k != "manifest_sha256"})))


def rewrite(folder, change, seal: bool = False) -> None:
    """``change(manifest)`` in place, written back with the old hashes (or sealed again)."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    if seal:
        reseal(folder)


@pytest.fixture
def ft_m_artifact(tokenizer, corpus, tmp_path):
    lm = tiny_model("llama", tokenizer)
    editor, stack = edit("ft-m", lm, corpus)
    artifact = save_edit(editor, tmp_path / "edit", facts=[CASE, OTHER])
    stack.revert()
    return artifact


def test_a_corrupted_byte_inside_the_tensor_file_is_refused_naming_folder_and_file(ft_m_artifact):
    file = ft_m_artifact.path / "edit.safetensors"
    data = bytearray(file.read_bytes())
    data[len(data) - 100] ^= 0x40  # inside the tensor data: safetensors alone would read it without complaint
    file.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"^{file}: field sha256: \w+ differs from the manifest's") as refused:
        load_edit(ft_m_artifact.path)
    assert (refused.value.file, refused.value.field) == ("edit.safetensors", "sha256")


def test_a_truncated_or_missing_file_is_refused(ft_m_artifact):
    file = ft_m_artifact.path / "edit.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=rf"^{file}: field bytes: {len(data) // 2} bytes, the manifest records "
                                            rf"{len(data)}: the file is truncated"):
        load_edit(ft_m_artifact.path)
    reseal(ft_m_artifact.path)  # the hashes of the truncated file: still not a safetensors file
    with pytest.raises(ArtifactError, match=rf"^{file}: not a readable safetensors file"):
        load_edit(ft_m_artifact.path)
    file.unlink()
    with pytest.raises(ArtifactError, match=rf"^{file}: missing or not a file \(the manifest lists it\)"):
        load_edit(ft_m_artifact.path)


def test_a_changed_config_with_the_old_hash_and_a_changed_identity_are_refused(ft_m_artifact, tokenizer):
    folder = ft_m_artifact.path
    original = (folder / "manifest.json").read_text()
    rewrite(folder, lambda m: m["model"]["config"].update(hidden_size=64))
    with pytest.raises(ArtifactError, match=r"manifest.json: field model.config: its sha256 differs from "
                                            r"model.config_sha256"):
        load_edit(folder)
    (folder / "manifest.json").write_text(original)
    rewrite(folder, lambda m: m["model"]["identity"].update(gguf_sha256="0" * 64))
    with pytest.raises(ArtifactError, match=r"manifest.json: field manifest_sha256: does not match the manifest's"):
        load_edit(folder)
    reseal(folder)  # consistent, but not the model's identity: refused when applied, naming it
    lm = tiny_model("llama", tokenizer)
    lm.identity["gguf_sha256"] = "1" * 64
    before = state(lm)
    with pytest.raises(EditMismatchError, match=rf"manifest.json: field model: .*identity gguf_sha256: {'1' * 64} "
                                                rf"here, {'0' * 64} in the edit's base"):
        load_edit(folder).apply(lm)
    assert_same_state(lm, before)


def test_whitespace_and_key_order_of_the_manifest_do_not_count(ft_m_artifact, tokenizer):
    path = ft_m_artifact.path / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(dict(reversed(manifest.items())), indent=7))
    assert load_edit(ft_m_artifact.path).manifest == manifest
    path.write_text(path.read_text().replace('"format": "overtone-edit"', '"format": "overtone-edit", "format": 1'))
    with pytest.raises(ArtifactError, match=r"not valid JSON: field 'format' appears twice"):
        load_edit(ft_m_artifact.path)


@pytest.mark.parametrize("shape", [(1, 64), (64, 32), (32, 64, 1)])
def test_a_wrongly_shaped_tensor_is_refused_never_broadcast(ft_m_artifact, tokenizer, shape):
    folder = ft_m_artifact.path
    (name, delta), = ft_m_artifact.saved.tensors.items()
    wrong = torch.ones(shape, dtype=delta.dtype)  # (1, 64) would broadcast into every row of the weight
    save_file({name: wrong}, str(folder / "edit.safetensors"))
    with pytest.raises(ArtifactError, match=r"edit.safetensors: field (bytes|sha256): "):
        load_edit(folder)  # not the file that was saved
    reseal(folder)
    with pytest.raises(ArtifactError, match=rf"edit.safetensors: field {name}: shape \[{shape[0]}, .* differs from the "
                                            r"manifest's \[32, 64\] \(edit.tensors\)"):
        load_edit(folder)  # the file's hash recorded, but not the tensor the manifest lists
    rewrite(folder, lambda m: m["edit"]["tensors"][name].update(tensor_record(wrong)), seal=True)
    with pytest.raises(ArtifactError, match=rf"edit.safetensors: field {name}: shape \[.*\] differs from the weight's "
                                            r"\[32, 64\] \(a change is added element by element, never broadcast\)"):
        load_edit(folder)  # consistent files, but not a change of that weight
    lm = tiny_model("llama", tokenizer)
    before = state(lm)
    with pytest.raises(ValueError, match=rf"FT-M: a saved change does not have its weight's shape: {name}"):
        FTM.apply_saved(lm, FTMConfig(layer=3), SavedEdit(tensors={name: wrong}))  # the editor refuses it too
    assert_same_state(lm, before)


def test_an_edit_that_names_another_weight_is_refused(tokenizer, corpus, tmp_path):
    lm = tiny_model("llama", tokenizer)
    editor, stack = edit("rome", lm, corpus)
    folder = save_edit(editor, tmp_path / "edit").path
    stack.revert()
    other = "model.layers.2.mlp.down_proj.weight"  # same shape, but its original values are not recorded
    rewrite(folder, lambda m: m["edit"]["state"]["updates"].__setitem__(0, other), seal=True)
    with pytest.raises(ArtifactError, match=rf"manifest.json: field edit.state.updates\[0\]: refers to '{other}', "
                                            r"which is not among the parameters"):
        load_edit(folder)


def test_a_previous_format_version_is_refused_with_how_to_save_it_again(ft_m_artifact):
    rewrite(ft_m_artifact.path, lambda m: m.update(format_version=1))
    with pytest.raises(ArtifactError, match=r"field format_version: format version 1 .* records no hashes of its "
                                            r"files, so it cannot be verified; edit the facts again and save with "
                                            r"`overtone edit --save`"):
        load_edit(ft_m_artifact.path)


def test_the_base_model_is_the_users_choice(ft_m_artifact, tmp_path, monkeypatch):
    """A manifest's folder or hub id needs --model or --trust-manifest-model; a relative path is never used."""
    artifact = ft_m_artifact
    model = artifact.manifest["model"]
    assert choose_base([artifact], "some/model", False) == BaseChoice("some/model", "given with --model")
    assert choose_base([], None, False).source == "smollm2-135m"
    embedded = dict(artifact.manifest, model=dict(model, identity={"name": "smollm2-135m", "gguf_sha256": "a" * 64}))
    assert choose_base([replace(artifact, manifest=embedded)], None, False).source == "smollm2-135m"

    def named(identity, name="tiny-llama"):
        return [replace(artifact, manifest=dict(artifact.manifest, model=dict(model, identity=identity, name=name)))]

    folder = str(tmp_path)
    with pytest.raises(ArtifactError, match=rf"field model.identity: the edit was made on the local folder {folder}; "
                                            r"give the base model with --model .* or accept the manifest's with "
                                            r"--trust-manifest-model"):
        choose_base(named({"path": folder}), None, False)
    assert choose_base(named({"path": folder}), None, True).source == folder
    monkeypatch.chdir(tmp_path)
    (tmp_path / "etc").mkdir()
    for relative in ("etc", "../../../etc"):
        with pytest.raises(ArtifactError, match=rf"field model.identity.path: '{re.escape(relative)}' is a relative "
                                                r"path, which would depend on the current folder"):
            choose_base(named({"path": relative}), None, True)
    with pytest.raises(ArtifactError, match=r"the edit was made on the hub model 'org/model', which would be "
                                            r"downloaded; give the base model with --model"):
        choose_base(named({"name": "org/model"}, "org/model"), None, False)
    assert choose_base(named({"name": "org/model"}, "org/model"), None, True).source == "org/model"
    for not_hub in ("../../../etc", "/etc", "etc"):  # "etc" is a folder here: a hub id must not mean a path
        with pytest.raises(ArtifactError, match=r"field model.name: '.*' is (not a hub id|a hub id and also a path)"):
            choose_base(named({"name": not_hub}, not_hub), None, True)
