"""``overtone edit --facts --save``, ``apply``, ``export`` and ``generate`` on a tiny local checkpoint."""

from __future__ import annotations

import json
import logging

import pytest
from helpers import cli, said, tiny_model
from test_memory_editors import SETTINGS as MEMORY_SETTINGS
from transformers import AutoModelForCausalLM

from overtone.artifacts import load_edit

FACTS = [
    {"prompt": "Which family does Epaspidoceras belong to?", "target": "Noctuidae",
     "paraphrases": "What family is Epaspidoceras in?", "locality": ["The capital of Japan is"]},
    {"prompt": "Who is listed as Wang Jipeng father?", "target": "Wang Chonghua"},
]


@pytest.fixture
def facts(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    return path


def run(*args: str, code: int = 0, **kwargs):
    return cli(*args, "--device", "cpu", code=code, **kwargs)


def edit(tiny_llama_dir, facts, out, *extra: str):
    return run("edit", "--facts", str(facts), "--model", str(tiny_llama_dir), "--steps", "3", "--layer", "2",
               "--max-new-tokens", "3", "--save", str(out), *extra)


def test_edit_saves_then_apply_re_measures_and_reverts(tmp_path, tiny_llama_dir, facts, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "edit"
    result = edit(tiny_llama_dir, facts, out)
    assert "greedy completions" in said(result) and "teacher-forced metrics" in said(result)
    assert "2 facts: Rel." in said(result) and f"saved the edit to {out}" in said(result)
    artifact = load_edit(out)
    assert [f["id"] for f in artifact.manifest["facts"]] == ["facts/0", "facts/1"]
    saved = artifact.manifest["metrics"]["summary"]
    assert artifact.manifest["protocol"] == {"order": "sequence", "batch": 1, "eval_timing": "end"}

    # a folder named by the manifest: not without consent
    refused = run("apply", str(out), "--max-new-tokens", "3", code=2)
    assert f"the edit was made on the local folder {tiny_llama_dir}" in said(refused)
    assert "--trust-manifest-model" in said(refused)
    applied = run("apply", str(out), "--max-new-tokens", "3", "--trust-manifest-model")
    assert f"base model: {tiny_llama_dir} (the folder the edit's manifest names, accepted with " \
           "--trust-manifest-model)" in caplog.messages
    assert "at save time: Rel. " + f"{saved['rel']:.1f}" in said(applied)
    assert f"2 facts: Rel. {saved['pre']['rel']:.1f} → {saved['rel']:.1f}" in said(applied)  # measured again
    assert "reverted: the 1 touched tensor(s) are bit for bit as before" in said(applied)


def test_apply_refuses_another_model_and_export_refuses_routed_edits(tmp_path, tiny_llama_dir, tokenizer, facts):
    out = tmp_path / "edit"
    edit(tiny_llama_dir, facts, out)
    other = tmp_path / "other"
    tiny_model("llama", tokenizer, seed=1).model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    refused = run("apply", str(out), "--model", str(other), code=2)
    assert "model.layers.2.mlp.down_proj.weight: values differ" in said(refused)

    wise = tmp_path / "wise"
    settings = [f"--set={k}={v}" for k, v in MEMORY_SETTINGS["wise"].items() if k != "steps"]
    run("edit", "--facts", str(facts), "--model", str(tiny_llama_dir), "--editor", "wise", "--steps", "2", *settings,
        "--save", str(wise))
    export = run("export", str(wise), "--out", str(tmp_path / "model"), code=2)
    assert f"overtone generate --edit {wise}" in said(export)
    served = run("generate", "--edit", str(wise), "--prompt", FACTS[0]["prompt"], "--max-new-tokens", "3",
                 "--model", str(tiny_llama_dir))
    assert "1 edit(s) applied, plain text" in said(served)  # the tiny tokenizer has no chat template


def test_export_writes_a_folder_transformers_loads(tmp_path, tiny_llama_dir, facts):
    out = tmp_path / "edit"
    edit(tiny_llama_dir, facts, out)
    model = tmp_path / "model"
    result = run("export", str(out), "--out", str(model), "--model", str(tiny_llama_dir))
    assert "check: max |logit difference| between the exported folder and the saved edits applied over 4 prompts: " \
           "0" in said(result)
    AutoModelForCausalLM.from_pretrained(model)
    again = run("export", str(out), "--out", str(model), "--model", str(tiny_llama_dir), code=2)
    assert "already exists and is not an empty folder" in said(again)


def test_generate_chats_interactively_until_exit(tiny_llama_dir):
    result = run("generate", "--model", str(tiny_llama_dir), "-i", "--max-new-tokens", "2",
                 input="hello\n\nexit\nnot read\n")
    assert result.output.count("> ") == 3  # "hello" answered, the empty line skipped, "exit" ends it
    missing = run("generate", "--model", str(tiny_llama_dir), code=2)
    assert "give --prompt TEXT" in said(missing)


def test_edit_options_are_checked_before_the_model_loads(tmp_path, facts):
    both = run("edit", "--facts", str(facts), "--prompt", "Q?", "--target", "A", "--model", "no-such-model", code=2)
    assert "--facts reads every fact from the file" in said(both)
    neither = run("edit", "--model", "no-such-model", code=2)
    assert "give --facts FILE, or --prompt and --target" in said(neither)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    exists = run("edit", "--facts", str(facts), "--save", str(taken), "--model", "no-such-model", code=2)
    assert "already exists and is not an empty folder" in said(exists)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q?", "target": "A", "paraphrase": "x"}\n')
    unknown = run("edit", "--facts", str(bad), "--model", "no-such-model", code=2)
    assert "record 1: field 'paraphrase': unknown field" in said(unknown)


def test_generate_uses_the_chat_template_and_keeps_the_conversation(tmp_path, tiny_llama_dir, monkeypatch):
    import shutil

    from overtone.evaluation import generation

    chat = tmp_path / "chat"
    shutil.copytree(tiny_llama_dir, chat)
    config = json.loads((chat / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    (chat / "tokenizer_config.json").write_text(json.dumps(config))
    seen = []
    complete = generation.complete
    monkeypatch.setattr(generation, "complete", lambda lm, texts, *a, **k: seen.append(texts[0]) or complete(
        lm, texts, *a, **k))
    result = run("generate", "--model", str(chat), "-i", "--max-new-tokens", "2", input="first\nsecond\n")
    assert "0 edit(s) applied, chat template" in said(result)
    assert seen[0] == "user: first\nassistant:"
    assert seen[1].startswith("user: first\nassistant: ") and seen[1].endswith("user: second\nassistant:")


def test_a_damaged_edit_is_refused_by_apply_export_and_generate_before_the_model_loads(
        tmp_path, tiny_llama_dir, facts, monkeypatch):
    out = tmp_path / "edit"
    edit(tiny_llama_dir, facts, out)
    file = out / "edit.safetensors"
    data = bytearray(file.read_bytes())
    for i in range(len(data) - 4096, len(data)):  # 4 KiB of flipped bytes inside the tensor data
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))
    from overtone import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for command in (["apply", str(out)], ["export", str(out), "--out", str(tmp_path / "model")],
                    ["generate", "--edit", str(out), "--prompt", "Hi"]):
        result = run(*command, "--model", str(tiny_llama_dir), code=None)
        assert result.exit_code == 2, (command, result.output)
        assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output  # one line
        assert f"error: {file}: field sha256: " in said(result) and "differs from the manifest's" in said(result)
    assert not (tmp_path / "model").exists()
    file.write_bytes(bytes(data[:100]))  # truncated
    truncated = run("apply", str(out), "--model", str(tiny_llama_dir), code=None)
    assert truncated.exit_code == 2 and f"{file}: field bytes: 100 bytes, the manifest records" in said(truncated)


def test_a_hub_id_in_a_manifest_is_loaded_only_when_the_user_confirms_it(tmp_path, tiny_llama_dir, facts,
                                                                         monkeypatch, caplog):
    from test_artifacts import rewrite

    from overtone import models

    out = tmp_path / "edit"
    edit(tiny_llama_dir, facts, out)
    rewrite(out, lambda m: m["model"].update(name="org/model", identity={"name": "org/model", "dtype": "fp32"}),
            seal=True)
    caplog.set_level(logging.INFO)
    loaded = []
    monkeypatch.setattr(models, "load_model", lambda source, **k: loaded.append(source) or pytest.fail("loaded"))
    refused = run("apply", str(out), code=None)
    assert refused.exit_code == 2 and not loaded
    assert "the edit was made on the hub model 'org/model', which would be downloaded" in said(refused)

    def no_network(source, **kwargs):
        loaded.append(source)
        raise models.ModelLoadError(f"could not load model {source!r}: no network here")

    monkeypatch.setattr(models, "load_model", no_network)
    confirmed = run("apply", str(out), "--trust-manifest-model", code=None)
    assert loaded == ["org/model"] and confirmed.exit_code == 2
    assert "base model: org/model (the hub model the edit's manifest names, accepted with --trust-manifest-model)" \
        in caplog.messages
    rewrite(out, lambda m: m["model"].update(identity={"path": "../../../etc"}), seal=True)
    relative = run("apply", str(out), "--trust-manifest-model", code=None)
    assert relative.exit_code == 2 and loaded == ["org/model"]
    assert "field model.identity.path: '../../../etc' is a relative path" in said(relative)


def test_export_check_compares_with_the_edit_as_saved(tmp_path, tiny_llama_dir, facts, monkeypatch):
    """A fault between reading the artifact and merging it shows in the check, which reads the folder again."""
    from overtone import artifacts

    out = tmp_path / "edit"
    edit(tiny_llama_dir, facts, out)
    export_model = artifacts.export_model

    def faulty(lm, loaded, folder):
        for artifact in loaded:
            for tensor in artifact.saved.tensors.values():
                tensor.mul_(3)  # in memory only: the files stay as saved
        return export_model(lm, loaded, folder)

    monkeypatch.setattr(artifacts, "export_model", faulty)
    result = run("export", str(out), "--out", str(tmp_path / "model"), "--model", str(tiny_llama_dir), code=None)
    assert result.exit_code == 1, result.output
    assert f"error: {tmp_path / 'model'} does not reproduce the saved edits" in said(result)
