"""`--eval`, `--eval-context` and `--ability` on the command line; the tables and report that show both protocols."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import bench, cli

from overtone.evaluation import protocol_records
from overtone.report.page import build_sections
from overtone.report.runs import collect
from overtone.report.stats import paired_difference
from overtone.report.tables import _paired_layout, _summary_layout, single_editing_table


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir) -> Path:
    """CE and OverTone scored with both protocols, and a continual run with the ability check."""
    root = tmp_path_factory.mktemp("wild-runs")
    bench(root / "ce", tiny_llama_dir, "--objective", "ce", "--eval", "both")
    bench(root / "ot", tiny_llama_dir, "--objective", "overtone", "--epsilon", "0", "--eval", "both")
    bench(root / "ot-T2", tiny_llama_dir, "--objective", "overtone", "--sequence", "2", "--ability", "--eval", "wild")
    return root


def test_bench_records_both_protocols_and_names_them(runs):
    config = yaml.safe_load((runs / "ce" / "config.yaml").read_text())
    assert config["evaluation"] == {"protocols": ["teacher-forced", "wild"],
                                    "wild": {"context": "bare", "max_new_tokens": 50}}
    summary = json.loads((runs / "ce" / "summary.json").read_text())
    assert summary["protocols"] == ["teacher-forced", "wild"] and summary["wild"]["n_cases"] == 2
    record = json.loads((runs / "ce" / "cases.jsonl").read_text().splitlines()[0])
    assert {"pre", "post", "wild"} <= set(record) and "generations" in record["wild"]
    wild_only = json.loads((runs / "ot-T2" / "summary.json").read_text())
    assert wild_only["protocols"] == ["wild"] and wild_only["ability"]["n_measured"] == 1
    config = yaml.safe_load((runs / "ot-T2" / "config.yaml").read_text())
    assert config["ability"]["documents"] == 64 and config["ability"]["facts"] == 35


def test_tables_put_the_protocols_side_by_side_with_paired_differences(runs):
    rows, results = [], []
    for name in ("ce", "ot"):
        summary = json.loads((runs / name / "summary.json").read_text())
        records = [json.loads(line) for line in (runs / name / "cases.jsonl").read_text().splitlines()]
        rows.append((name, summary))
        results.append((name, summary, records))
    table = _summary_layout(rows)
    assert [g for g, _ in table.groups] == ["TF", "wild", ""]
    assert table.groups[1][1] == ["Rel.", "Gen.", "Por.", "Loc.", "Avg."]
    ot = table.rows()[1]
    assert ot[6:11] == [f"{rows[1][1]['wild'][m]:.2f}" for m in ("rel", "gen", "por", "loc", "avg")]
    paired = _paired_layout(results, base=0)
    assert [g for g, _ in paired.groups] == ["TF", "wild", ""]
    ce, ot = (protocol_records(records, "wild") for _, _, records in results)
    assert paired.rows()[0][1 + 6].startswith(f"{paired_difference(ce, ot, 'rel').mean:+.2f}")  # after TF's 6 cells


def test_report_shows_both_protocols_the_deltas_the_shrink_figure_and_the_ability(runs):
    inputs = collect([runs])
    views = [v for r in inputs.runs for v in r.views()]
    table = single_editing_table(views)
    assert [g for g, _ in table.groups] == ["ZsRE, teacher-forced", "ZsRE, wild (EM)"]
    delta = next(row for row in table.rows() if row[0].startswith("Δ FT-M OverTone − CE"))
    ce, ot = (next(v for v in views if v.path.name == n and v.evaluation == "wild") for n in ("ce", "ot"))
    expected = paired_difference(ce.records, ot.records, "rel")
    assert delta[1 + len(table.groups[0][1])].startswith(f"{expected.mean:+.2f}")
    sections = {s.anchor: s for s in build_sections(inputs)}
    assert {"runs", "tables", "gains", "wild", "ability"} <= set(sections)
    assert any(getattr(item, "name", "") == "wild_shrink" for item in sections["wild"].items)
    only_tf = {s.anchor: s for s in build_sections(inputs, protocols=("teacher-forced",))}
    assert "wild" not in only_tf
    tf_table = next(t for t in only_tf["tables"].items if t.title.startswith("Single editing"))
    assert [g for g, _ in tf_table.groups] == ["ZsRE"]


def test_table_command_prints_the_wild_scores_cost_and_ability(runs):
    result = cli("table", runs / "ce", runs / "ot", runs / "ot-T2", "--markdown")
    assert "| run | TF Rel." in result.output and "wild Rel." in result.output
    assert "eval s/case TF" in result.output and "perplexity drift %" in result.output
    summary = json.loads((runs / "ce" / "summary.json").read_text())["wild"]
    detail = next(line for line in result.output.splitlines() if line.startswith("| ce (") and line.count("|") == 14)
    assert "wild Loc. same reply % | wild Loc. tok-identical %" in result.output
    assert f"| {summary['loc']:.1f} | {summary['loc_tokens']['loc']:.1f} |" in detail


def test_ability_every_prints_the_drift_curve_and_is_checked_before_the_model_loads(tmp_path, tiny_llama_dir):
    bench(tmp_path / "curve", tiny_llama_dir, "--sequence", "2", "--ability-every", "1")
    summary = json.loads((tmp_path / "curve" / "summary.json").read_text())
    assert [p["edits"] for p in summary["ability"]["curve"]] == [1, 2]
    assert yaml.safe_load((tmp_path / "curve" / "config.yaml").read_text())["ability"]["every"] == 1
    assert "General ability along each chunk of edits" in cli("table", tmp_path / "curve", "--markdown").output
    result = cli("bench", "--out", tmp_path / "x", "--model", "no-such-model", "--sequence", "2",
                 "--ability-every", "2", code=None)
    assert result.exit_code != 0 and "--ability-every 2 measures within a chunk of --sequence 2" in result.output
    assert not (tmp_path / "x").exists()


def test_eval_options_are_checked_before_any_case_runs(tmp_path, tiny_llama_dir):
    base = ["bench", "--out", str(tmp_path / "x"), "--model", str(tiny_llama_dir), "--device", "cpu"]
    assert "Invalid value for --eval: 'generated'" in cli(*base, "--eval", "generated", code=2).output
    assert "--eval-context qa applies to the wild evaluation" in cli(*base, "--eval-context", "qa", code=2).output
    assert not (tmp_path / "x" / "cases.jsonl").exists()
