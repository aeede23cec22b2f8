"""The evaluation cache: the unedited model's results are read from the cache instead of recomputed, and the records
are identical with and without it (but for timings and the count of hits); a damaged entry is recomputed; concurrent
writers leave valid entries; the key follows the model, the probes and the settings; an edited model is refused."""

from __future__ import annotations

import json
import logging
import multiprocessing
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import bench, cli, said, tiny_model

from overtone.benchmarks import EditCase, Probe
from overtone.cachedir import EntryStore
from overtone.editors import FTM, FTMConfig
from overtone.evaluation import EvalCache, Evaluator, WildSettings, make_evaluator
from overtone.evaluation import teacher_forced as tf
from overtone.objectives import CrossEntropy
from overtone.runner import ResultStore, read_run, run_continual

UNTIMED = ("eval_s", "edit_s", "eval_cache_hits", "seconds")  # timings, and the count this test compares apart


def untimed(value: Any) -> Any:
    """A record without its timing fields and its count of cache hits, at every depth."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in UNTIMED}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def entries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.json") if p.name != "model.json"]


def own_answer_case(case: EditCase) -> EditCase:
    """``case`` with a locality probe without an answer: scored on the unedited model's own continuation."""
    return replace(case, locality={**case.locality, "own": (Probe("The capital of France is", ""),)})


@pytest.mark.parametrize("parallel", [1, 3])
@pytest.mark.parametrize("evaluation", ["teacher-forced", "both"])
def test_records_are_identical_with_and_without_the_cache(tmp_path, tiny_llama, zsre_cases, eval_cache_dir,
                                                          parallel, evaluation):
    """Without the cache, with it cold (it fills) and warm (every unedited result read from it): the same records.
    Warm, no unedited pass runs, so FT-M's edited pass cannot replay recorded activations and runs the whole
    model: its logits are the same."""
    cases = [own_answer_case(zsre_cases[0]), *zsre_cases[1:5]]
    cache = EvalCache(tiny_llama)  # as the runner makes it: before the model's first edit
    editor = FTM(tiny_llama, FTMConfig(layer=2, lr=0.2, steps=4), CrossEntropy())

    def run(directory: str, cached: bool) -> list[dict[str, Any]]:
        evaluator = make_evaluator("teacher-forced", tiny_llama, eval_mode=evaluation,
                                   wild=WildSettings(max_new_tokens=8), cache=cache if cached else None)
        with ResultStore(tmp_path / directory, {"parallel": parallel}) as store:
            run_continual(editor, evaluator, cases, store, parallel=parallel)
        return read_run(tmp_path / directory)[1]

    plain = run("plain", cached=False)
    cold = run("cold", cached=True)
    stored = len(entries(eval_cache_dir))
    warm = run("warm", cached=True)
    assert "eval_cache_hits" not in plain[0]
    assert [r["eval_cache_hits"] for r in cold] == [0] * len(cases)
    assert all(r["eval_cache_hits"] > 0 for r in warm)
    assert len(entries(eval_cache_dir)) == stored > 0  # warm: nothing new
    assert untimed(plain) == untimed(cold) == untimed(warm)
    assert any(r["post"]["loc"] < 1 or r["post"]["rel"] != r["pre"]["rel"] for r in warm)  # the edits did something


def test_a_hit_makes_no_unedited_pass_and_the_edited_pass_runs_in_full(tiny_llama, zsre_cases, monkeypatch):
    """Warm, ``before`` computes nothing (the forward and the own answer's generation would fail) and records
    nothing to replay."""
    case = own_answer_case(zsre_cases[0])
    evaluator = Evaluator(tiny_llama)
    evaluator.eval_cache = EvalCache(tiny_llama)
    cold = evaluator.before(case, record_from=2)
    assert cold.cache is not None and cold.hits == 0

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the unedited model ran")

    monkeypatch.setattr(evaluator, "_answer_logits", forbidden)
    monkeypatch.setattr(tf, "greedy_complete", forbidden)
    warm = evaluator.before(case, record_from=2)
    assert warm.cache is None and warm.hits == len(warm.predictions.tokens)
    assert warm.probes.pairs == cold.probes.pairs
    assert all(torch.equal(a, b) for a, b in zip(warm.predictions.tokens, cold.predictions.tokens, strict=True))


@pytest.mark.parametrize("damage", ["truncated", "checksum", "shape", "key"])
def test_a_damaged_entry_is_recomputed_and_overwritten(tiny_llama, zsre_cases, eval_cache_dir, caplog, damage):
    evaluator = Evaluator(tiny_llama)
    evaluator.eval_cache = EvalCache(tiny_llama)
    first = evaluator.before(zsre_cases[0], record_from=None)
    (path,) = entries(eval_cache_dir)
    good = path.read_text()
    entry = json.loads(good)
    if damage == "truncated":
        path.write_text(good[: len(good) // 2])
    elif damage == "checksum":
        entry["value"][0][0] += 1
        path.write_text(json.dumps(entry))
    elif damage == "shape":  # a valid checksum over a value of the wrong shape
        from overtone.cachedir import _sha256, canonical

        entry["value"] = entry["value"][1:]
        entry["sha256"] = _sha256(canonical({"key": entry["key"], "value": entry["value"]}))
        path.write_text(json.dumps(entry))
    else:
        from overtone.cachedir import _sha256, canonical

        entry["key"]["settings"] = {"other": 1}
        entry["sha256"] = _sha256(canonical({"key": entry["key"], "value": entry["value"]}))
        path.write_text(json.dumps(entry))
    with caplog.at_level(logging.WARNING):
        again = evaluator.before(zsre_cases[0], record_from=None)
    assert again.hits == 0
    assert [t.tolist() for t in again.predictions.tokens] == [t.tolist() for t in first.predictions.tokens]
    assert str(path) in caplog.text and "recomputing" in caplog.text
    assert json.loads(path.read_text()) == json.loads(good)  # overwritten with the computed value
    assert evaluator.before(zsre_cases[0], record_from=None).hits > 0


def _write_many(root: str, rounds: int) -> None:
    store = EntryStore(Path(root))
    for _ in range(rounds):
        for i in range(40):
            store.write({"model": {"name": "m", "sha256": "ab" * 32}, "probe": i}, {"rows": [[i] * 50] * 20})


def test_concurrent_writers_leave_only_valid_entries(tmp_path):
    """Two processes writing the same entries at once, while this one reads them: every read is a miss or the whole
    value, and at the end every entry is valid and no temporary file is left."""
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_write_many, args=(str(tmp_path), 15)) for _ in range(2)]
    for writer in writers:
        writer.start()
    store = EntryStore(tmp_path)
    reads = 0
    while any(w.is_alive() for w in writers):
        for i in range(40):
            value = store.read({"model": {"name": "m", "sha256": "ab" * 32}, "probe": i})
            assert value is None or value == {"rows": [[i] * 50] * 20}
            reads += value is not None
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    assert all(store.read({"model": {"name": "m", "sha256": "ab" * 32}, "probe": i}) == {"rows": [[i] * 50] * 20}
               for i in range(40))
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert reads > 0


def test_the_key_follows_the_model_the_probes_and_the_settings(tokenizer, tiny_llama):
    cache = EvalCache(tiny_llama)
    key = cache.key("wild", {"context": "bare"}, {"texts": ["a"]})
    assert key is not None
    assert key == EvalCache(tiny_model("llama", tokenizer)).key("wild", {"context": "bare"}, {"texts": ["a"]})
    others = [
        cache.key("wild", {"context": "qa"}, {"texts": ["a"]}),
        cache.key("wild", {"context": "bare"}, {"texts": ["b"]}),
        cache.key("teacher-forced", {"context": "bare"}, {"texts": ["a"]}),
        EvalCache(tiny_model("llama", tokenizer, seed=1)).key("wild", {"context": "bare"}, {"texts": ["a"]}),
        EvalCache(tiny_model("llama", tokenizer, dtype=torch.bfloat16)).key("wild", {"context": "bare"},
                                                                          {"texts": ["a"]}),
        EvalCache(tiny_model("qwen2", tokenizer)).key("wild", {"context": "bare"}, {"texts": ["a"]}),
    ]
    paths = {EntryStore().path(k) for k in [key, *others]}  # type: ignore[list-item]
    assert len(paths) == 1 + len(others)
    assert {"eval_code", "overtone", "torch", "transformers"} <= key["versions"].keys()
    assert key["device"]["type"] == "cpu" and key["device"]["threads"] == torch.get_num_threads()


def test_the_cache_is_refused_while_the_model_has_live_edits(tiny_llama, zsre_cases, caplog, eval_cache_dir):
    """An edit (or an applied artifact) makes the model another one: no key, nothing read or written, one warning;
    after a bit-exact revert it is the unedited model again (only the reverted matrix is hashed again)."""
    cache = EvalCache(tiny_llama)
    base = cache.key("wild", {}, {"texts": ["a"]})
    editor = FTM(tiny_llama, FTMConfig(layer=2, lr=0.2, steps=4), CrossEntropy())
    handle = editor.edit([zsre_cases[0]])
    evaluator = Evaluator(tiny_llama)
    evaluator.eval_cache = cache
    with caplog.at_level(logging.WARNING):
        assert cache.key("wild", {}, {"texts": ["a"]}) is None
        pre = evaluator.before(zsre_cases[1], record_from=None)
    assert pre.hits == 0 and not entries(eval_cache_dir)
    assert caplog.text.count("evaluation cache not used") == 1
    handle.revert()
    assert cache.key("wild", {}, {"texts": ["a"]}) == base


def test_a_model_changed_before_its_first_use_is_refused(tokenizer):
    lm = tiny_model("llama", tokenizer)
    with torch.no_grad():
        lm.model.model.layers[1].mlp.down_proj.weight.add_(1.0)  # e.g. an artifact applied right after loading
    assert EvalCache(lm).key("wild", {}, {"texts": ["a"]}) is None


def test_cli_eval_cache_runs_info_and_clear(tmp_path, tiny_llama_dir, eval_cache_dir):
    bench(tmp_path / "cold", tiny_llama_dir)
    bench(tmp_path / "warm", tiny_llama_dir, "--objective", "ce")
    bench(tmp_path / "off", tiny_llama_dir, "--no-eval-cache")
    cold, warm, off = (read_run(tmp_path / name) for name in ("cold", "warm", "off"))
    assert cold[0]["eval_cache"] is True and off[0]["eval_cache"] is False
    assert [r["eval_cache_hits"] for r in cold[1]] == [0, 0]
    assert all(r["eval_cache_hits"] > 0 for r in warm[1])
    assert all("eval_cache_hits" not in r for r in off[1])
    assert untimed(cold[1]) == untimed(off[1])
    shown = said(cli("cache", "info"))
    assert str(eval_cache_dir) in shown and tiny_llama_dir.name in shown  # the model, named by its path
    count = len(entries(eval_cache_dir))
    assert f"{count} entries" in shown
    assert "no entries of that model" in said(cli("cache", "clear", "--model", "other", code=2))
    assert f"removed {count} entries of 1 model(s)" in said(cli("cache", "clear", "--model", str(tiny_llama_dir)))
    assert not entries(eval_cache_dir)
    assert "no entries" in said(cli("cache", "info"))


def test_cache_info_imports_no_torch(tmp_path):
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "overtone", "cache", "info"],
                          capture_output=True, text=True, env={"OVERTONE_CACHE": str(tmp_path), "PYTHONPATH": "src",
                                                               "PATH": "/usr/bin:/bin"},
                          cwd=Path(__file__).parent.parent, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    modules = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "overtone.cachedir" in modules
    assert not {"torch", "transformers"} & modules


def test_study_files_set_the_cache_and_cell_ids_do_not_change():
    from overtone.study import load_study

    fixed = {"dataset": "zsre", "editor": "ft-m", "limit": 2}
    on = load_study({"name": "s", "fixed": fixed})
    off = load_study({"name": "s", "fixed": {**fixed, "eval_cache": False}})
    assert [c.id for c in on.cells] == [c.id for c in off.cells]
    assert all(c.run_spec().eval_cache for c in on.cells) and not any(c.run_spec().eval_cache for c in off.cells)
    assert not any(c.eval_cache for c in load_study({"name": "s", "fixed": fixed}, None, {"eval_cache": False}).cells)
