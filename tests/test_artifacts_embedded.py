"""Edits as files on the real embedded model: three ZsRE facts edited with FT-M + OverTone, saved, exported,
and the export loaded by plain transformers in a process that cannot import this package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_same_state, state

from overtone import Evaluator, greedy_complete, load_benchmark, make_editor
from overtone.artifacts import export_model, folder_bytes, load_edit, save_edit
from overtone.editors import FTM, EditStack
from overtone.objectives import OverTone
from overtone.runner import edit_chunk

pytestmark = pytest.mark.slow

UNRELATED = ["The capital of Japan is", "Water boils at a temperature of"]
TOKENS = 6
# Runs with this package blocked from import: sys.modules["overtone"] = None makes any import of it fail.
PLAIN = textwrap.dedent("""
    import json, sys
    sys.modules["overtone"] = None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, prompts, tokens, logits_file = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    completions, logits = [], []
    with torch.no_grad():
        for prompt in prompts:
            enc = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**enc, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            completions.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
            logits.append(model(**enc).logits[0])
    torch.save(logits, logits_file)
    print(json.dumps(completions))
""")


def test_three_zsre_facts_saved_exported_and_loaded_by_plain_transformers(tmp_path, smollm):
    lm = smollm
    cases = load_benchmark("zsre", limit=3)
    prompts = [c.prompt for c in cases] + UNRELATED
    base_state = state(lm)
    base = greedy_complete(lm, prompts, TOKENS)

    editor = make_editor("ft-m", lm, OverTone(FTM.overtone_defaults))
    stack = EditStack()
    records = edit_chunk(editor, Evaluator(lm), cases, keep=stack)
    # In a sequence the later edits of the same matrix disturb the first one a little (Rel. 0.75, 1, 1 here);
    # the dataset's locality probes keep their answers.
    reliable = [r["post"]["rel"] == 1.0 for r in records]
    assert sum(reliable) >= 2 and all(r["post"]["loc"] == 1.0 for r in records)
    edited = greedy_complete(lm, prompts, TOKENS)
    with torch.no_grad():
        edited_logits = [lm.model(**lm.tokenizer(p, return_tensors="pt")).logits[0] for p in prompts]
    artifact = save_edit(editor, tmp_path / "edit", facts=cases, metrics={"cases": records})
    assert folder_bytes(artifact.path) < 8e6  # one 576 x 1536 delta in fp64 (7.1 MB) and the manifest
    stack.revert()
    assert_same_state(lm, base_state)

    out = export_model(lm, [load_edit(artifact.path)], tmp_path / "model")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    logits_file = tmp_path / "logits.pt"
    done = subprocess.run([sys.executable, "-c", PLAIN, str(out), json.dumps(prompts), str(TOKENS), str(logits_file)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    plain = json.loads(done.stdout.strip().splitlines()[-1])
    for case, ok, before, after in zip(cases, reliable, base, plain[:3], strict=False):
        assert after != before, (case.target, before, after)
        assert after.strip().startswith(case.target) or not ok, (case.target, after)
    assert plain[3:] == base[3:]  # unrelated prompts: unchanged
    assert plain == edited
    exported_logits = torch.load(logits_file)
    difference = max((a - b).abs().max().item() for a, b in zip(exported_logits, edited_logits, strict=True))
    assert difference == 0.0  # FT-M exports the edited weights bit for bit
