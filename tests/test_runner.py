"""Single editing over cases into a results directory that survives interruptions."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import assert_same_state, counting_ftm, state

from overtone.evaluation import Evaluator
from overtone.runner import ResultStore, RunError, StoreError, read_run, run_single_editing, summarize
from overtone.runner.bench import edit_and_score

CONFIG = {"editor": {"name": "ft-m"}, "objective": {"name": "ce"}, "limit": 3, "threads": 1}


def editor_for(lm):
    return counting_ftm(lm)


def test_each_case_is_independent_and_reverted(tiny_llama, zsre_cases):
    before = state(tiny_llama)
    editor, evaluator = editor_for(tiny_llama), Evaluator(tiny_llama)
    first = edit_and_score(editor, evaluator, zsre_cases[0])
    assert_same_state(tiny_llama, before)
    again = edit_and_score(editor, evaluator, zsre_cases[0])
    assert first["post"] == again["post"] and first["losses"] == again["losses"]
    assert set(first["post"]) == {"rel", "gen", "por", "loc"}
    assert set(first["pre"]) == {"rel", "gen", "por"}
    assert first["steps"] == 3 and first["edit_s"] > 0


def test_run_writes_config_jsonl_and_summary_and_resumes(tmp_path, tiny_llama, zsre_cases):
    cases = zsre_cases[:3]
    editor = editor_for(tiny_llama)
    summary = run_single_editing(editor, Evaluator(tiny_llama), cases[:2], ResultStore(tmp_path, CONFIG))
    assert summary["n_cases"] == 2
    config, records, saved = read_run(tmp_path)
    assert config["editor"]["name"] == "ft-m" and saved == summary
    assert [r["case_id"] for r in records] == ["zsre/0", "zsre/1"]
    assert set(summary) >= {"rel", "gen", "por", "loc", "avg"}
    assert summary["avg"] == pytest.approx(sum(summary[m] for m in ("rel", "gen", "por", "loc")) / 4, abs=0.01)
    # restart with more cases: only the new one is edited
    editor2 = editor_for(tiny_llama)
    summary = run_single_editing(editor2, Evaluator(tiny_llama), cases, ResultStore(tmp_path, CONFIG))
    assert editor2.edited == ["zsre/2"] and summary["n_cases"] == 3


def test_failure_keeps_finished_cases_and_names_the_case(tmp_path, tiny_llama, zsre_cases):
    editor = editor_for(tiny_llama)
    editor.fail_on = "zsre/1"
    with pytest.raises(RunError, match=r"case zsre/1 failed: synthetic failure\. The 1 finished cases are saved"):
        run_single_editing(editor, Evaluator(tiny_llama), zsre_cases[:3], ResultStore(tmp_path, CONFIG))
    _, records, _ = read_run(tmp_path)
    assert [r["case_id"] for r in records] == ["zsre/0"]


def test_partial_last_line_is_dropped_on_restart(tmp_path, tiny_llama, zsre_cases):
    with ResultStore(tmp_path, CONFIG) as store:
        run_single_editing(editor_for(tiny_llama), Evaluator(tiny_llama), zsre_cases[:1], store)
    with open(tmp_path / "cases.jsonl", "a") as fh:
        fh.write('{"case_id": "zsre/1", "pre"')  # killed mid-write
    store = ResultStore(tmp_path, CONFIG)
    assert store.done == {"zsre/0"}
    run_single_editing(editor_for(tiny_llama), Evaluator(tiny_llama), zsre_cases[:2], store)
    lines = (tmp_path / "cases.jsonl").read_text().splitlines()
    assert [json.loads(line)["case_id"] for line in lines] == ["zsre/0", "zsre/1"]


def test_restart_with_another_config_is_refused(tmp_path):
    ResultStore(tmp_path, CONFIG)
    ResultStore(tmp_path, {**CONFIG, "threads": 2, "limit": 10})  # volatile keys may change
    with pytest.raises(StoreError, match=r"objective.name: 'ce' -> 'overtone'"):
        ResultStore(tmp_path, {**CONFIG, "objective": {"name": "overtone"}})
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["objective"]["name"] == "ce"


def test_summary_averages_only_cases_with_probes():
    records = [
        {"pre": {"rel": 0.0, "gen": 0.0, "por": 0.5}, "post": {"rel": 1.0, "gen": 0.5, "por": None, "loc": 1.0},
         "steps": 4, "edit_s": 1.0, "eval_s": 0.5},
        {"pre": {"rel": 0.5, "gen": 0.0, "por": 0.5}, "post": {"rel": 0.5, "gen": 0.5, "por": 0.2, "loc": 0.8},
         "steps": 6, "edit_s": 1.0, "eval_s": 0.5},
    ]
    s = summarize(records)
    assert (s["rel"], s["gen"], s["por"], s["loc"]) == (75.0, 50.0, 20.0, 90.0)
    assert s["avg"] == pytest.approx((75 + 50 + 20 + 90) / 4, abs=0.01)
    assert s["mean_steps"] == 5 and s["pre"]["rel"] == 25.0
