"""One runner for every command that edits: the same cell through ``bench`` and ``study run`` gives the same
records; ``trace`` scores and flags its edits as ``bench`` does; runs record the code that made them."""

from __future__ import annotations

import shutil

import pytest
import yaml
from helpers import RUN_VARYING
from typer.testing import CliRunner

from overtone.cli import app
from overtone.report.runs import mixed_code
from overtone.runner import ResultStore, RunSpec, SpecError, read_run
from overtone.runner.bench import divergence
from overtone.runner.settings import SettingError, coerce
from overtone.version import code_identity

runner = CliRunner()
TIMING = RUN_VARYING


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def bench(tmp_path, tiny_llama_dir, name: str, *more: str, objective: str = "overtone") -> str:
    out = tmp_path / name
    result = runner.invoke(app, ["bench", "--editor", "ft-m", "--objective", objective, "--dataset", "zsre",
                                 "--limit", "3", "--model", str(tiny_llama_dir), "--device", "cpu", "--layer", "2",
                                 "--steps", "3", "--out", str(out), *more])
    assert result.exit_code == 0, result.output
    return str(out)


def test_a_cell_gives_the_same_records_through_bench_and_study_run(tmp_path, tiny_llama_dir):
    from pathlib import Path

    out = Path(bench(tmp_path, tiny_llama_dir, "bench"))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "name": "same", "fixed": {"model": str(tiny_llama_dir), "device": "cpu", "dataset": "zsre", "limit": 3,
                                  "editor": "ft-m", "variant": ["overtone"]},
        "editors": {"ft-m": {"settings": {"layer": 2, "steps": 3}}}}))
    result = runner.invoke(app, ["study", "run", str(study), "--out", str(tmp_path / "study")])
    assert result.exit_code == 0, result.output
    (cell,) = [p for p in (tmp_path / "study").iterdir() if (p / "config.yaml").exists()]
    bench_config, bench_records, _ = read_run(out)
    cell_config, cell_records, _ = read_run(cell)
    assert len(bench_records) == 3
    assert without_timing(cell_records) == without_timing(bench_records)
    same = ("editor", "objective", "model", "dataset", "protocol", "seed", "code", "overtone_version")
    assert {k: cell_config[k] for k in same} == {k: bench_config[k] for k in same}
    assert bench_config["code"] == code_identity() and set(code_identity()) == {"version", "revision", "dirty"}


def test_trace_scores_and_flags_its_edits_like_bench(tmp_path, tiny_llama_dir):
    out = tmp_path / "trace"
    result = runner.invoke(app, ["trace", "--limit", "3", "--model", str(tiny_llama_dir), "--device", "cpu",
                                 "--layer", "2", "--steps", "3", "--lr", "1e30", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "trace.json").exists() and (out / "fig1_probe_loss.png").exists()
    _, traced, summary = read_run(out / "ce")
    _, benched, _ = read_run(bench(tmp_path, tiny_llama_dir, "bench", "--lr", "1e30", objective="ce"))
    assert without_timing(traced) == without_timing(benched)
    assert [r["diverged"] for r in traced] == [divergence(r) is not None for r in traced]
    assert any(r["diverged"] for r in traced) and summary["n_diverged"] == sum(r["diverged"] for r in traced)
    again = runner.invoke(app, ["trace", "--limit", "1", "--model", str(tiny_llama_dir), "--device", "cpu",
                                "--layer", "2", "--steps", "2", "--out", str(out)])
    assert again.exit_code == 0, again.output  # a trace replaces its earlier records
    assert len(read_run(out / "ce")[1]) == 1


def test_table_warns_when_runs_come_from_different_code(tmp_path, tiny_llama_dir):
    first = tmp_path / "first"
    shutil.copytree(bench(tmp_path, tiny_llama_dir, "run"), first)
    other = tmp_path / "other"
    shutil.copytree(first, other)
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["code"] = {"version": "0.1.0", "revision": "f" * 40, "dirty": False}
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    alone = runner.invoke(app, ["table", str(first), str(first)])
    assert alone.exit_code == 0 and ("warning" in alone.output) == bool(code_identity()["dirty"])
    result = runner.invoke(app, ["table", str(first), str(other)])
    assert result.exit_code == 0, result.output
    assert "different or uncommitted code" in result.output and "0.1.0 @ ffffffffff" in result.output


def test_mixed_code_names_the_runs_and_their_code():
    clean = {"version": "0.1.0", "revision": "a" * 40, "dirty": False}
    assert mixed_code([("a", {"code": clean}), ("b", {"code": clean})]) is None
    assert "b: 0.1.0 @ aaaaaaaaaa (dirty)" in mixed_code([("a", {"code": clean}),
                                                         ("b", {"code": {**clean, "dirty": True}})])
    old = mixed_code([("a", {"code": clean}), ("old", {"overtone_version": "0.1.0"})])
    assert "old: 0.1.0 (revision not recorded)" in old
    resumed = {"code": clean, "code_before": [{**clean, "revision": "b" * 40}]}
    assert "r: 0.1.0 @ bbbbbbbbbb then 0.1.0 @ aaaaaaaaaa" in mixed_code([("r", resumed)])


def test_a_run_resumes_under_other_code_and_records_it(tmp_path):
    clean = {"version": "0.1.0", "revision": "a" * 40, "dirty": False}
    with ResultStore(tmp_path, {"editor": "ft-m", "code": clean}) as store:
        store.append({"case_id": "x"})
    newer = {**clean, "revision": "b" * 40}
    with ResultStore(tmp_path, {"editor": "ft-m", "code": newer}) as store:
        assert store.done == {"x"}
    config = read_run(tmp_path)[0]
    assert config["code"] == newer and config["code_before"] == [clean]


def test_one_coercer_for_set_strings_and_study_values():
    kind = tuple[tuple[int, int], ...]
    assert coerce("5,10;10,10", kind, "k") == coerce([[5, 10], [10, 10]], kind, "k") == ((5, 10), (10, 10))
    assert coerce("5e-3", float, "lr") == coerce(0.005, float, "lr") == 0.005
    assert coerce("none", int | None, "k") is None and coerce("true", bool, "k") is True
    for value, wanted, message in ((2.5, int, "k: expected an integer"), ("maybe", bool, "k: expected true or false"),
                                   (3, str, "k: expected a string")):
        with pytest.raises(SettingError, match=message):
            coerce(value, wanted, "k")


def test_the_spec_checks_options_once_with_the_option_named():
    for fields, message in (({"batch": 3, "sequence": 2}, "--batch 3 needs --sequence >= 3"),
                            ({"parallel": "many"}, "--parallel takes a number of cases or auto"),
                            ({"parallel": 0}, "--parallel must be >= 1"),
                            ({"ability_every": 2, "sequence": 2}, "--ability-every 2 measures within a chunk"),
                            ({"eval_context": "qa"}, "--eval-context qa applies to the wild evaluation"),
                            ({"editor": "nope"}, "unknown editor 'nope'")):
        with pytest.raises(SpecError, match=message):
            RunSpec(**{"editor": "ft-m", **fields})
    assert RunSpec(editor="lora", parallel="4").parallel == 4
