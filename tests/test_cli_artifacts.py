"""``overtone edit --facts --save``, ``apply``, ``export`` and ``generate`` on a tiny local checkpoint."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_model
from test_memory_editors import SETTINGS as MEMORY_SETTINGS
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from overtone.artifacts import load_edit
from overtone.cli import app

runner = CliRunner()
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


def run(*args: str):
    return runner.invoke(app, [*args, "--device", "cpu"])


def said(result) -> str:
    """The output as one line: rich wraps long lines (paths) at the console width."""
    return " ".join(result.output.split())


def edit(tiny_llama_dir, facts, out, *extra: str):
    result = run("edit", "--facts", str(facts), "--model", str(tiny_llama_dir), "--steps", "3", "--layer", "2",
                 "--max-new-tokens", "3", "--save", str(out), *extra)
    assert result.exit_code == 0, result.output
    return result


def test_edit_saves_then_apply_re_measures_and_reverts(tmp_path, tiny_llama_dir, facts):
    out = tmp_path / "edit"
    result = edit(tiny_llama_dir, facts, out)
    assert "greedy completions" in said(result) and "teacher-forced metrics" in said(result)
    assert "2 facts: Rel." in said(result) and f"saved the edit to {out}" in said(result)
    artifact = load_edit(out)
    assert [f["id"] for f in artifact.manifest["facts"]] == ["facts/0", "facts/1"]
    saved = artifact.manifest["metrics"]["summary"]
    assert artifact.manifest["protocol"] == {"order": "sequence", "batch": 1, "eval_timing": "end"}

    applied = run("apply", str(out), "--max-new-tokens", "3")  # the base model comes from the manifest
    assert applied.exit_code == 0, applied.output
    assert "at save time: Rel. " + f"{saved['rel']:.1f}" in said(applied)
    assert f"2 facts: Rel. {saved['pre']['rel']:.1f} → {saved['rel']:.1f}" in said(applied)  # measured again
    assert "reverted: the 1 touched tensor(s) are bit for bit as before" in said(applied)


def test_apply_refuses_another_model_and_export_refuses_routed_edits(tmp_path, tiny_llama_dir, tokenizer, facts):
    out = tmp_path / "edit"
    edit(tiny_llama_dir, facts, out)
    other = tmp_path / "other"
    tiny_model("llama", tokenizer, seed=1).model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    refused = run("apply", str(out), "--model", str(other))
    assert refused.exit_code == 2 and "model.layers.2.mlp.down_proj.weight: values differ" in said(refused)

    wise = tmp_path / "wise"
    settings = [f"--set={k}={v}" for k, v in MEMORY_SETTINGS["wise"].items() if k != "steps"]
    run_wise = run("edit", "--facts", str(facts), "--model", str(tiny_llama_dir), "--editor", "wise", "--steps", "2",
                   *settings, "--save", str(wise))
    assert run_wise.exit_code == 0, run_wise.output
    export = run("export", str(wise), "--out", str(tmp_path / "model"))
    assert export.exit_code == 2 and f"overtone generate --edit {wise}" in said(export)
    served = run("generate", "--edit", str(wise), "--prompt", FACTS[0]["prompt"], "--max-new-tokens", "3")
    assert served.exit_code == 0, served.output
    assert "1 edit(s) applied, plain text" in said(served)  # the tiny tokenizer has no chat template


def test_export_writes_a_folder_transformers_loads(tmp_path, tiny_llama_dir, facts):
    out = tmp_path / "edit"
    edit(tiny_llama_dir, facts, out)
    model = tmp_path / "model"
    result = run("export", str(out), "--out", str(model))
    assert result.exit_code == 0, result.output
    assert "check: max |logit difference| between the exported folder and the edited model over 4 prompts: 0" \
        in said(result)
    AutoModelForCausalLM.from_pretrained(model)
    again = run("export", str(out), "--out", str(model))
    assert again.exit_code == 2 and "already exists and is not an empty folder" in said(again)


def test_generate_chats_interactively_until_exit(tiny_llama_dir):
    result = runner.invoke(app, ["generate", "--model", str(tiny_llama_dir), "-i", "--max-new-tokens", "2",
                                 "--device", "cpu"], input="hello\n\nexit\nnot read\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("> ") == 3  # "hello" answered, the empty line skipped, "exit" ends it
    missing = run("generate", "--model", str(tiny_llama_dir))
    assert missing.exit_code == 2 and "give --prompt TEXT" in said(missing)


def test_edit_options_are_checked_before_the_model_loads(tmp_path, facts):
    both = run("edit", "--facts", str(facts), "--prompt", "Q?", "--target", "A", "--model", "no-such-model")
    assert both.exit_code == 2 and "--facts reads every fact from the file" in said(both)
    neither = run("edit", "--model", "no-such-model")
    assert neither.exit_code == 2 and "give --facts FILE, or --prompt and --target" in said(neither)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    exists = run("edit", "--facts", str(facts), "--save", str(taken), "--model", "no-such-model")
    assert exists.exit_code == 2 and "already exists and is not an empty folder" in said(exists)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q?", "target": "A", "paraphrase": "x"}\n')
    unknown = run("edit", "--facts", str(bad), "--model", "no-such-model")
    assert unknown.exit_code == 2 and "record 1: field 'paraphrase': unknown field" in said(unknown)


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
    result = runner.invoke(app, ["generate", "--model", str(chat), "-i", "--max-new-tokens", "2", "--device", "cpu"],
                           input="first\nsecond\n")
    assert result.exit_code == 0, result.output
    assert "0 edit(s) applied, chat template" in said(result)
    assert seen[0] == "user: first\nassistant:"
    assert seen[1].startswith("user: first\nassistant: ") and seen[1].endswith("user: second\nassistant:")
