"""Study files, their cells and ids, the driver with the local executor, and the study tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import RUN_VARYING
from typer.testing import CliRunner

from overtone.cli import app
from overtone.editors import EDITORS
from overtone.report.bootstrap import paired_estimates, row_estimates
from overtone.runner import read_run, summarize
from overtone.study import StudyError, load_study
from overtone.study.driver import DONE, SKIPPED, Scheduler, run_study
from overtone.study.executors import ExecutorOptions, LocalExecutor, make_executor

SRC = Path(__file__).resolve().parent.parent / "src"
STUDIES = Path(__file__).resolve().parent.parent / "studies"
TIMINGS = RUN_VARYING


def spec(model, **changes):
    """A small study on the tiny model: FT-M and LoRA, CE and OverTone, two seeds, 6 ZsRE cases."""
    base = {
        "name": "tiny",
        "fixed": {"model": str(model), "device": "cpu", "dataset": "zsre", "limit": 6},
        "axes": {"editor": ["ft-m", "lora"], "variant": ["ce", "overtone"], "seed": [0, 1]},
        "editors": {"ft-m": {"settings": {"steps": 3, "lr": 0.05}}, "lora": {"settings": {"steps": 3}}},
    }
    for key, value in changes.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return base


def without_timings(records):
    return sorted(({k: v for k, v in r.items() if k not in TIMINGS} for r in records), key=lambda r: r["case_id"])


def test_ids_are_deterministic_and_change_only_with_what_changes_results(monkeypatch):
    first = [c.id for c in load_study(spec("m")).cells]
    assert first == [c.id for c in load_study(spec("m")).cells]
    assert len(set(first)) == len(first) == 6  # FT-M runs once (no seeds), LoRA once per seed
    # limit and threads do not change a case's result: the same cells, extended or run faster
    assert first == [c.id for c in load_study(spec("m", fixed={"limit": 50, "threads": 2})).cells]
    lr = load_study(spec("m", editors={"ft-m": {"settings": {"steps": 3, "lr": 0.01}}})).cells
    assert [c.id for c in lr if c.editor == "ft-m"] != first[:2]
    assert [c.id for c in lr if c.editor == "lora"] == first[2:]
    assert load_study(spec("m", fixed={"dtype": "bf16"})).cells[0].id != first[0]
    monkeypatch.setattr("overtone.study.spec.__version__", "9.9.9")
    assert not set(first) & {c.id for c in load_study(spec("m")).cells}


def test_seeds_repeat_editors_with_random_parts_only():
    study = load_study(spec("m"))
    seeds = {(c.editor, c.variant.slug): [] for c in study.cells}
    for c in study.cells:
        seeds[(c.editor, c.variant.slug)].append((c.seed, c.editor_settings.get("seed")))
    assert seeds[("ft-m", "ce")] == [(0, None)] and seeds[("lora", "overtone")] == [(0, 0), (1, 1)]
    assert study.notes == ["ft-m has no random parts (no seed setting): it runs once, with seed 0, instead of once "
                           "per seed 0, 1"]


def test_study_values_are_typed_and_errors_name_the_key(tmp_path):
    cells = load_study(spec("m", editors={"lora": {"settings": {"lr": "5e-3", "layers": [1, 2]}}})).cells
    lora = next(c for c in cells if c.editor == "lora").editor_settings
    assert lora["lr"] == 0.005 and lora["layers"] == (1, 2)  # YAML reads 5e-3 as a string
    bad = {
        "editors.ft-m.settings: unknown setting 'rank'": spec("m", editors={"ft-m": {"settings": {"rank": 4}}}),
        "editor 'nope' is unknown": spec("m", axes={"editor": ["nope"]}),
        "editors.lora.settings.steps: expected an integer": spec("m", editors={"lora": {"settings": {"steps": 2.5}}}),
        "dataset is both fixed and an axis": spec("m", axes={"dataset": ["zsre"]}),
        "seed is set by the seed axis": spec("m", editors={"lora": {"settings": {"seed": 3}}}),
        "OverTone lam must lie in [0, 1]": spec("m", editors={"ft-m": {"overtone": {"lam": 2}}}),
        "variant[0]: expected ce, overtone": spec("m", axes={"variant": ["cee"]}),
        # a sweep or ablation option that is not a list (a fuzzed file found the first one)
        "variant[1].sweep.lambda: give a list, got None": spec(
            "m", axes={"variant": ["ce", {"sweep": {"lambda": None}}]}),
        "variant[0].ablation.stop_grid: give a list, got 0.1": spec(
            "m", axes={"variant": [{"ablation": {"stop_grid": 0.1}}]}),
    }
    for message, wrong in bad.items():
        with pytest.raises(StudyError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
            load_study(wrong)
    path = tmp_path / "s.yaml"
    path.write_text("fixed: [1, 2")
    with pytest.raises(StudyError, match=f"{path}: not valid YAML"):
        load_study(path)


def test_profiles_and_command_line_overrides():
    raw = spec("m", profiles={"big": {"fixed": {"model": "big-model", "dtype": "bf16"},
                                      "editors": {"lora": {"settings": {"init_rank": 8}}}}})
    study = load_study(raw, profile="big", overrides={"device": "cuda", "limit": None})
    cell = next(c for c in study.cells if c.editor == "lora")
    assert (cell.model.name, cell.model.dtype, cell.model.device, cell.limit) == ("big-model", "bf16", "cuda", 6)
    assert cell.editor_settings["init_rank"] == 8 and cell.editor_settings["steps"] == 3  # merged, not replaced
    with pytest.raises(StudyError, match="no profile 'small'; profiles: big"):
        load_study(raw, profile="small")


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_study_files_expand_with_every_profile(path):
    raw = yaml.safe_load(path.read_text())
    named = {raw["fixed"].get("editor"), *raw.get("axes", {}).get("editor", [])} - {None}
    if named - set(EDITORS):  # the lifelong files name editors of another branch (tests/test_stream.py reads them)
        pytest.skip(f"{path.name} names editor(s) {', '.join(sorted(named - set(EDITORS)))}, not in this tree yet")
    for profile in [None, *raw.get("profiles", {})]:
        study = load_study(path, profile)
        assert study.cells and len({c.id for c in study.cells}) == len(study.cells)
        if profile is not None:
            assert all(c.model.dtype == "bf16" and c.model.device == "cuda" for c in study.cells)


def test_continual_chunks_are_never_split_and_single_cases_are_sharded(tiny_llama_dir, tmp_path):
    study = load_study(spec(tiny_llama_dir, fixed={"limit": 7}, axes={"editor": ["ft-m"], "variant": ["ce"],
                                                                      "seed": [0], "sequence": [1, 3]}))
    scheduler = Scheduler(study, tmp_path, shard_size=4)
    single, continual = (scheduler.cells[c.id] for c in study.cells)
    assert [len(t.case_ids) for t in single.queue] == [4, 3]
    # T = 3: chunks of 3 cases (the last of 1), one chunk per task, never cut
    assert [[(i, len(ids)) for i, ids in t.chunks] for t in continual.queue] == [[(0, 3)], [(1, 3)], [(2, 1)]]


def test_local_study_equals_bench_runs_and_restarts_without_repeating(tiny_llama_dir, tmp_path):
    """The study runner is the one runner: its cells hold what `overtone bench` writes; a restart adds nothing."""
    study = load_study(spec(tiny_llama_dir, axes={"editor": ["ft-m"], "variant": ["ce", "overtone"], "seed": [0]}))
    out = tmp_path / "study"
    scheduler = run_study(study, out, LocalExecutor(ExecutorOptions()), shard_size=4)
    assert {s.status for s in scheduler.cells.values()} == {DONE}
    for cell in study.cells:
        bench = tmp_path / cell.variant.slug
        result = CliRunner().invoke(app, [
            "bench", "--editor", "ft-m", "--objective", cell.variant.slug, "--limit", "6", "--out", str(bench),
            "--model", str(tiny_llama_dir), "--device", "cpu", "--steps", "3", "--lr", "0.05"])
        assert result.exit_code == 0, result.output
        config, records, summary = read_run(out / cell.name)
        bench_config, bench_records, _ = read_run(bench)
        assert config == bench_config
        assert without_timings(records) == without_timings(bench_records)
        assert summary == summarize(records)
    # a kill mid-write leaves a partial last line: the restart drops it, reruns that case only, and stores each once
    cases = out / study.cells[0].name / "cases.jsonl"
    lines = cases.read_text().splitlines(keepends=True)
    cases.write_text("".join(lines[:-1]) + lines[-1][:20])
    run_study(study, out, LocalExecutor(ExecutorOptions()))
    again = read_run(out / study.cells[0].name)[1]
    assert without_timings(again) == without_timings(read_run(tmp_path / study.cells[0].variant.slug)[1])
    assert len(cases.read_text().splitlines()) == 6


def test_ray_is_optional(tiny_llama_dir, tmp_path):
    """Without Ray installed the package imports, plans and runs studies locally; asking for Ray is a clear error."""
    code = f"""
import sys
sys.modules["ray"] = None  # as if Ray were not installed: `import ray` raises ImportError
from pathlib import Path
from overtone.study import load_study
from overtone.study.driver import run_study
from overtone.study.executors import ExecutorOptions, make_executor
study = load_study({json.dumps(spec(tiny_llama_dir, fixed={"limit": 2}, axes={"editor": ["ft-m"], "variant": ["ce"]}))})
try:
    make_executor("ray", ExecutorOptions())
except ValueError as exc:
    print("RAY:", exc)
scheduler = run_study(study, Path({str(tmp_path)!r}), make_executor("local", ExecutorOptions()))
print("STATUS:", sorted(s.status for s in scheduler.cells.values()))
"""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "RAY: the ray executor needs Ray: pip install 'overtone[ray]' (ray==2.60.0)" in done.stdout
    assert "STATUS: ['done']" in done.stdout


def test_matched_steps_control_waits_for_its_source(tiny_llama_dir, tmp_path):
    """The control runs after its source, on its cases and step counts; without an early stop it is not needed."""
    raw = spec(tiny_llama_dir, fixed={"limit": 3},
               axes={"editor": ["ft-m"], "seed": [0], "variant": [{"ablation": {"chk_lambda": 0.1}}]},
               editors={"ft-m": {"settings": {"steps": 3}, "overtone": {"lam": 0.3, "epsilon": 1e6}}})
    study = load_study(raw)
    controls = [c for c in study.cells if c.after]
    assert [study.cell(c.after).variant.slug for c in controls] == ["overtone", "overtone-clip-stop", "tie-mix",
                                                                    "clip-value-zero", "clip-test-prob"]
    scheduler = run_study(study, tmp_path, LocalExecutor(ExecutorOptions()))
    states = {s.cell.variant.slug: s for s in scheduler.cells.values()}
    assert states["ce-steps-of-overtone"].status == SKIPPED  # the host loop ran all 3 steps
    assert states["ce-steps-of-overtone-clip-stop"].status == DONE  # epsilon 1e6: clipped at once, 0 steps
    assert [r["steps"] for r in read_run(tmp_path / states["ce-steps-of-overtone-clip-stop"].cell.name)[1]] == [0] * 3
    status = CliRunner().invoke(app, ["study", "status", str(tmp_path)])
    assert status.exit_code == 0 and "not needed" in status.output and "OverTone never stopped early" in status.output


def test_a_failing_cell_is_reported_and_the_others_finish(tiny_llama_dir, tmp_path):
    raw = spec(tiny_llama_dir, fixed={"limit": 2}, axes={"editor": ["ft-m", "wise"], "variant": ["ce"], "seed": [0]})
    scheduler = run_study(load_study(raw), tmp_path, LocalExecutor(ExecutorOptions()))
    outcome = {s.cell.editor: (s.status, s.message) for s in scheduler.cells.values()}
    assert outcome["ft-m"][0] == DONE
    assert outcome["wise"][0] == "failed" and "WISE has no preset for model" in outcome["wise"][1]


def test_study_cli_plan_run_status_table(tiny_llama_dir, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec(tiny_llama_dir, fixed={"limit": 3})))
    runner = CliRunner()
    plan = runner.invoke(app, ["study", "plan", str(path)])
    assert plan.exit_code == 0, plan.output
    assert "6 cells, 18 edits" in plan.output and "ft-m has no random parts" in plan.output
    out = tmp_path / "out"
    run = runner.invoke(app, ["study", "run", str(path), "--out", str(out)])
    assert run.exit_code == 0, run.output
    assert "6 cell(s) done" in run.output
    status = runner.invoke(app, ["study", "status", str(out)])
    assert "6 done" in status.output and "no driver is running" in status.output
    assert "ft-m: " in status.output and "cases per worker-hour" in status.output
    table = runner.invoke(app, ["study", "table", str(out), "--markdown"])
    assert table.exit_code == 0, table.output
    assert "| **LoRA** |" in table.output and "OverTone − CE" in table.output and "3 cases × 2 seeds" in table.output
    bad = runner.invoke(app, ["study", "run", str(path), "--out", str(out), "--workers", "2"])
    assert bad.exit_code == 2 and "the local executor runs one worker" in bad.output


# ---- bootstrap intervals


def records(values, chunk=None):
    return [{"case_id": f"c{i}", "pre": {}, "post": {"rel": v, "loc": 1 - v}, "steps": 1, "edit_s": 0, "eval_s": 0,
             **({"chunk": i // chunk} if chunk else {})} for i, v in enumerate(values)]


def test_row_estimates_are_the_summary_means_with_an_interval_around_them():
    by_seed = {0: records([1.0, 0.0, 1.0, 1.0]), 1: records([1.0, 0.5, 0.0, 1.0])}
    est = row_estimates(by_seed, ["rel", "loc"])
    per_seed = [summarize(r) for r in by_seed.values()]
    for m in ("rel", "loc", "avg"):
        assert est[m].mean == pytest.approx(sum(s[m] for s in per_seed) / 2, abs=0.01)
        assert est[m].low <= est[m].mean <= est[m].high and est[m].seeds == 2 and est[m].units == 4
    assert est["rel"].high - est["rel"].low > 10  # real spread over cases and seeds
    constant = row_estimates({0: records([1.0] * 5)}, ["rel", "loc"])
    assert (constant["rel"].low, constant["rel"].high, constant["loc"].mean) == (100.0, 100.0, 0.0)
    assert row_estimates(by_seed, ["rel"]) == row_estimates(by_seed, ["rel"])  # seeded: reproducible tables
    chunks = row_estimates({0: records([1.0, 0.0, 1.0, 1.0], chunk=2)}, ["rel"])["rel"]
    assert (chunks.units, chunks.unit, chunks.mean) == (2, "chunk", 75.0)


def test_paired_estimates_are_the_difference_of_rows_on_common_cases():
    base = {0: records([0.0, 0.5, 0.5, 0.0]), 1: records([0.0, 0.5, 0.5, 0.5])}
    other = {0: records([1.0, 1.0, 1.0, 0.5]), 1: records([0.5, 1.0, 1.0, 1.0])[:3]}  # seed 1 lacks case c3
    diff = paired_estimates(base, other, ["rel", "loc"])
    common = {0: 4, 1: 3}
    rows = {}
    for name, runs in (("base", base), ("other", other)):
        rows[name] = [summarize([r for r in runs[s] if int(r["case_id"][1:]) < common[s]]) for s in (0, 1)]
    for m in ("rel", "loc", "avg"):
        expected = sum(o[m] - b[m] for o, b in zip(rows["other"], rows["base"], strict=True)) / 2
        assert diff[m].mean == pytest.approx(expected, abs=0.01)  # summaries are rounded
    assert diff["rel"].excludes_zero and diff["rel"].low > 0
    assert diff["rel"].p_value < 0.05 and diff["loc"].p_value < 0.05 and diff["loc"].high < 0
    assert paired_estimates(base, base, ["rel"])["rel"].p_value == 1.0  # every replicate is 0: no difference
    # the two-sided bootstrap p-value: twice the smaller share of replicates on a side of 0
    mixed = paired_estimates({0: records([0.0, 1.0, 0.0, 0.5])}, {0: records([0.5, 0.0, 0.5, 1.0])}, ["rel"])["rel"]
    assert 0.05 < mixed.p_value < 1.0 and not mixed.excludes_zero



def test_one_stream_against_another_has_no_interval():
    """A stream (or any run of one chunk) against another, one seed each: every bootstrap replicate is the one
    difference, so the table gives the difference without an interval, no significance mark and no Holm test."""
    base = {0: records([0.0, 0.5, 0.5, 0.0], chunk=4)}
    other = {0: records([1.0, 1.0, 1.0, 0.5], chunk=4)}
    diff = paired_estimates(base, other, ["rel"])["rel"]
    assert (diff.units, diff.unit, diff.has_interval, diff.excludes_zero) == (1, "chunk", False, False)
    assert diff.signed() == "+62.50 (no interval: 1 chunk)"
    assert str(row_estimates(other, ["rel"])["rel"]) == "87.50 (1 chunk)"
    two = paired_estimates({0: records([0.0, 0.5, 0.5, 0.0], chunk=2)}, {0: records([1.0, 1.0, 1.0, 0.5], chunk=2)},
                           ["rel"])["rel"]
    assert two.has_interval and two.excludes_zero

def test_a_studys_streams_get_their_lifelong_tables_one_row_per_seed():
    from overtone.study.tables import Row, stream_tables

    def stream(efficacy):
        return [{**r, "chunk": 0, "lifelong": {"pre": {"efficacy": 0.0}, "post": {"efficacy": e}},
                 "curve": [{"edits": 2, "rel": 50.0}]}
                for r, e in zip(records([0.0, 1.0, 1.0, 1.0]), efficacy, strict=True)]

    cell = {"model": {"name": "m"}, "dataset": "counterfact-mend", "editor": "alphaedit", "variant": "ce",
            "label": "CE", "batch": 2, "stream": {"curve_every": 2}}
    rows = [Row([{**cell, "seed": 0}, {**cell, "seed": 1}], {0: stream([0.0, 1.0, 1.0, 1.0]),
                                                             1: stream([1.0, 1.0, 0.0, 1.0])}),
            Row([{**cell, "stream": None}], {0: records([1.0])})]  # not a stream: no lifelong tables
    lifelong, curve, by_batch = stream_tables(rows)
    assert lifelong.title == "m, counterfact-mend: lifelong metrics, unedited → after the stream"
    assert [r[:2] for r in lifelong.sections[0][1]] == [["AlphaEdit CE, seed 0", "0.00 → 75.00"],
                                                       ["AlphaEdit CE, seed 1", "0.00 → 75.00"]]
    assert curve.sections[0][1] == [["2", "50.00", "–", "–", "–", "–", "–", "–"]]
    assert dict(by_batch.sections)["efficacy"] == [["AlphaEdit CE, seed 0", "50.00", "100.00"],
                                                  ["AlphaEdit CE, seed 1", "100.00", "50.00"]]


def test_a_studys_streams_are_paired_on_their_lifelong_metrics_too():
    """OverTone - CE of two streams with two seeds: the KnowEdit table and the lifelong one, each the mean over
    seeds of the per-seed differences, a stream being one unit (chunk) per seed."""
    from overtone.study.tables import Row, paired_tables

    def stream(rel, efficacy):
        return [{**r, "chunk": 0, "lifelong": {"pre": {}, "post": {"efficacy": e, "fluency": 5.0}}}
                for r, e in zip(records(rel), efficacy, strict=True)]

    cell = {"model": {"name": "m"}, "dataset": "counterfact-mend", "sequence": 4, "eval_timing": "end",
            "editor": "alphaedit", "batch": 2, "stream": {"curve_every": 2}, "status": "done"}
    ce = Row([{**cell, "variant": "ce", "label": "CE", "seed": s} for s in (0, 1)],
             {0: stream([1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0]), 1: stream([1.0] * 4, [0.0, 0.0, 1.0, 1.0])})
    ot = Row([{**cell, "variant": "overtone", "label": "OverTone", "seed": s} for s in (0, 1)],
             {0: stream([1.0] * 4, [1.0] * 4), 1: stream([1.0] * 4, [1.0] * 4)})
    knowedit, lifelong = paired_tables([ce, ot])
    assert lifelong.title.endswith("paired differences of the lifelong metrics (x100)")
    assert lifelong.headers[1:] == ["Δefficacy", "Δgeneralisation", "Δspecificity", "ΔAvg.", "paired on"]
    (label, efficacy, generalization, specificity, avg, units), = lifelong.sections[0][1]
    assert (label, generalization, specificity, units) == ("OverTone − CE", "–", "–", "1 chunks × 2 seeds")
    assert efficacy.startswith("+37.50 [+25.00, +50.00]") and avg.startswith("+37.50")  # seeds +25 and +50
    assert knowedit.sections[0][1][0][1].startswith("+12.50")  # Rel.: +25 and 0
    alone = paired_tables([Row([{**c, "stream": None} for c in ce.cells], ce.records),
                           Row([{**c, "stream": None} for c in ot.cells], ot.records)])
    assert len(alone) == 1  # not streams: the KnowEdit table only


def test_make_executor_names_the_choices():
    with pytest.raises(ValueError, match="unknown executor 'spark'; choose one of local, ray"):
        make_executor("spark", ExecutorOptions())
    with pytest.raises(ValueError, match="--address needs --executor ray"):
        make_executor("local", ExecutorOptions(address="auto"))


def test_rows_are_told_apart_by_name():
    custom = {"name": "CE", "objective": "ce", "settings": {"steps": 2}}
    with pytest.raises(StudyError, match="two different rows are both named 'ce'"):
        load_study(spec("m", axes={"editor": ["ft-m"], "variant": ["ce", custom]}))
    same = load_study(spec("m", axes={"editor": ["ft-m"], "variant": ["ce", {"name": "CE", "objective": "ce"}]}))
    assert [c.variant.slug for c in same.cells] == ["ce"]  # the same row given twice is one row


@pytest.mark.parametrize("variant", [{"sweep": {"lambda": [1e308]}}, {"sweep": {"epsilon": [-1.0]}}])
def test_a_sweep_value_out_of_range_is_refused_naming_the_file(tmp_path, variant):
    """Found by the study-file fuzz test: a value that only OverToneConfig checks escaped as a bare ValueError."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "fixed": {"dataset": "zsre", "limit": 2, "editor": "ft-m"},
                                    "axes": {"variant": [variant]}}))
    with pytest.raises(StudyError, match=str(path)):
        load_study(path)
