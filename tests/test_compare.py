"""Variants of a study, paired statistics, and the ablate / sweep commands."""

from __future__ import annotations

import json
import math
import random

import pytest
from scipy import stats
from typer.testing import CliRunner

from overtone.benchmarks import load_benchmark
from overtone.cli import app
from overtone.objectives import OverToneConfig
from overtone.report import paired_difference, paired_differences
from overtone.report.stats import holm
from overtone.report.tables import PAIRED_CAPTION, _paired_layout
from overtone.runner import read_run, summarize
from overtone.runner.variants import ablation_variants, matched_steps_variants, sweep_variants


def rec(case_id: str, **post) -> dict:
    return {"case_id": case_id, "post": {"rel": None, "gen": None, "por": None, "loc": None, **post}}


def test_paired_difference_mean_interval_and_counts():
    base = [rec("a", rel=0.5), rec("b", rel=1.0), rec("c", rel=0.0), rec("d", rel=1.0)]
    other = [rec("a", rel=1.0), rec("b", rel=1.0), rec("c", rel=0.5), rec("e", rel=1.0)]  # e is unpaired
    d = paired_difference(base, other, "rel")
    diffs = [50.0, 0.0, 50.0]
    assert d.n == 3 and (d.wins, d.ties, d.losses) == (2, 1, 0)
    assert d.mean == pytest.approx(100 / 3)
    sd = math.sqrt(sum((x - d.mean) ** 2 for x in diffs) / 2)
    assert d.half_width == pytest.approx(stats.t.ppf(0.975, 2) * sd / math.sqrt(3))
    assert not d.significant  # three cases cannot exclude zero here


def test_the_p_value_is_the_two_sided_paired_t_tests_and_agrees_with_the_interval():
    rng = random.Random(5)
    base = [rec(f"c{i}", rel=rng.random()) for i in range(12)]
    other = [rec(f"c{i}", rel=min(1.0, rng.random() + 0.2)) for i in range(12)]
    d = paired_difference(base, other, "rel")
    diffs = [100 * (o["post"]["rel"] - b["post"]["rel"]) for b, o in zip(base, other, strict=True)]
    assert d.p_value == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue)
    assert d.significant == (d.p_value < 0.05)
    same = paired_difference(base, base, "rel")
    assert same.p_value == 1.0 and not same.significant
    halves = [rec(f"c{i}", rel=i % 2 / 2) for i in range(4)]
    shifted = paired_difference(halves, [rec(r["case_id"], rel=r["post"]["rel"] + 0.25) for r in halves], "rel")
    assert shifted.p_value == 0.0 and shifted.significant  # every case gains the same: no spread, no doubt
    assert math.isnan(paired_difference(base[:2], other[:2], "rel").p_value)  # no interval, no test


def test_holm_against_a_hand_computed_family():
    # sorted: 0.005 <= .05/4 rejected, 0.01 <= .05/3 rejected, 0.03 > .05/2 stops: 0.03 and 0.04 are kept
    assert holm([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]
    # 0.02 <= .05/2 after 0.001 <= .05/3: rejected, though Bonferroni (.05/3 for all) would keep it
    assert holm([0.02, 0.001, 0.5]) == [True, True, False]
    # the smallest fails its threshold (0.02 > .05/3): nothing is rejected, though 0.04 <= .05 alone
    assert holm([0.02, 0.03, 0.04]) == [False, False, False]
    assert holm([0.04]) == [True] and holm([]) == []


def noisy_rows(rng, shift=0.0, cases=30):
    return [rec(f"c{i}", **{m: min(1.0, rng.random() + shift) for m in ("rel", "gen", "por", "loc")})
            for i in range(cases)]


def test_a_table_of_many_noisy_comparisons_marks_some_uncorrected_and_none_after_holm():
    rng = random.Random(3)
    summary = {"rel": 1.0, "gen": 1.0, "por": 1.0, "loc": 1.0, "avg": 1.0}
    results = [("base", summary, noisy_rows(rng)), *((f"noise {i}", summary, noisy_rows(rng)) for i in range(8)),
               ("real", summary, noisy_rows(rng, shift=0.5))]
    table = _paired_layout(results, 0, caption=PAIRED_CAPTION)
    assert "45 comparisons; † significant after Holm's correction" in table.caption
    noise = [cell for row in table.rows()[:-1] for cell in row[1:6]]
    assert sum(cell.endswith("*") for cell in noise) >= 3 and not any("†" in cell for cell in noise)
    real = table.rows()[-1][1:6]
    assert all(cell.endswith("*†") for cell in real)  # a real gain survives the correction
    # the marks are Holm's over all 45 p-values of the table, not row by row
    metrics = ["rel", "gen", "por", "loc", "avg"]
    found = [d for _, _, records in results[1:] for d in paired_differences(results[0][2], records, metrics).values()]
    assert ["†" in cell for row in table.rows() for cell in row[1:6]] == holm([d.p_value for d in found])


def test_fewer_than_three_units_give_no_interval():
    """Two chunks that both lose 2.5 points would give a zero-width t-interval and a false '*'."""
    base = [{**rec(f"c{i}", rel=1.0), "chunk": i // 2} for i in range(4)]
    other = [{**rec(f"c{i}", rel=0.95), "chunk": i // 2} for i in range(4)]
    d = paired_difference(base, other, "rel")
    assert (d.n, d.unit, d.cases) == (2, "chunk", 4) and d.mean == pytest.approx(-5.0)
    assert math.isinf(d.half_width) and not d.significant
    assert str(d) == "-5.00 (no interval: 2 chunks)"



def stream_records(rel: list[float], efficacy: list[float]) -> list[dict]:
    """One stream's records: every case in chunk 0, with its lifelong comparisons."""
    return [{**rec(f"c{i}", rel=r), "chunk": 0,
             "lifelong": {"pre": {"efficacy": 0.0}, "post": {"efficacy": e, "fluency": 4.0}}}
            for i, (r, e) in enumerate(zip(rel, efficacy, strict=True))]


def test_streams_pair_by_chunk_unless_asked_by_case_and_pair_their_lifelong_comparisons():
    base = stream_records([0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0, 1.0])
    other = stream_records([1.0, 1.0, 0.5, 0.5, 1.0], [1.0, 1.0, 1.0, 0.0, 1.0])
    results = [(name, {"rel": 50.0, "avg": 50.0, "lifelong": {"post": {}, "pre": {}}}, records)
               for name, records in (("ce", base), ("overtone", other))]
    by_chunk = _paired_layout(results, 0).sections[0][1][0]
    assert by_chunk[1] == "+60.00 (no interval: 1 chunk)"
    table = _paired_layout(results, 0, by_case=True)
    row = dict(zip([h for _, headers in table.groups for h in headers], table.sections[0][1][0][1:], strict=True))
    rel = paired_difference(base, other, "rel", by_case=True)
    assert rel.n == 5 and row["ΔRel."] == rel.marked and rel.mean == pytest.approx(60.0)
    efficacy = paired_difference([{"case_id": r["case_id"], "post": r["lifelong"]["post"]} for r in base],
                                 [{"case_id": r["case_id"], "post": r["lifelong"]["post"]} for r in other], "efficacy")
    assert row["Δefficacy"] == efficacy.marked and efficacy.mean == pytest.approx(40.0)
    assert "Δfluency (bits)" not in row  # bits, not a share: in the lifelong table only
    assert "optimistic" in table.caption


def test_stream_summaries_get_the_lifelong_table_and_the_curve():
    from overtone.report.tables import extra_tables

    life = {"pre": {"efficacy": 40.0, "generalization": 38.0, "specificity": 66.0, "fluency": None},
            "post": {"efficacy": 74.0, "generalization": 39.0, "specificity": 55.0, "fluency": 4.24},
            "curve": [{"edits": 1000, "rel": 28.17, "gen": 12.67, "loc": 10.0, "efficacy": 60.0}]}
    tables = {t.title: t for t in extra_tables([("ce", {"rel": 37.2, "lifelong": life}), ("plain", {"rel": 1.0})])}
    lifelong = tables["Lifelong metrics: unedited → after the stream"]
    assert lifelong.sections[0][1] == [["ce", "40.00 → 74.00", "38.00 → 39.00", "66.00 → 55.00", "– → 4.24"]]
    assert tables["Along the stream: ce"].sections[0][1] == [["1000", "28.17", "12.67", "10.00", "60.00", "–", "–",
                                                              "–"]]

def test_a_streams_edits_are_scored_by_the_batch_that_made_them_oldest_first():
    from overtone.report.tables import extra_tables, retention_tables

    # 6 edits in batches of 2, in stream order: Rel. 0, 0 | 0.5, 0.5 | 1, 1; efficacy 0, 1 | 1, 1 | 1, 1
    records = stream_records([0.0, 0.0, 0.5, 0.5, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    (table,) = retention_tables([("ce", 2, records)])
    assert table.groups == [("batch", ["1", "2", "3"])]
    assert dict(table.sections) == {"Rel.": [["ce", "0.00", "50.00", "100.00"]],
                                    "efficacy": [["ce", "50.00", "100.00", "100.00"]]}  # no Gen. recorded
    # 25 batches of one: pooled into 9 columns of 3 batches (the last holds one), each chunk by its own order
    long = [{**r, "chunk": c} for c in (0, 1) for r in stream_records([i / 24 for i in range(25)], [1.0] * 25)]
    (pooled,) = retention_tables([("ot", 1, long)])
    assert pooled.groups[0][1] == ["1-3", "4-6", "7-9", "10-12", "13-15", "16-18", "19-21", "22-24", "25"]
    assert pooled.sections[0][1][0][1] == "4.17" and pooled.sections[0][1][0][-1] == "100.00"  # mean of 0, 1/24, 2/24
    # streams of other layouts get their own table, and a summary table's extras carry them
    assert len(retention_tables([("ce", 2, records), ("ot", 1, long)])) == 2
    titles = [t.title for t in extra_tables([("ce", {"rel": 50.0})], [("ce", 2, records)])]
    assert titles == ["By the batch that made the edit, on the final model"]
    assert retention_tables([("empty", 2, [])]) == []


def test_table_and_report_show_a_stream_run_by_the_batch_that_made_each_edit(tmp_path):
    import yaml

    records = [{**r, "pre": {"rel": 0.0}, "steps": 1, "edit_s": 0.1, "eval_s": 0.1}
               for r in stream_records([0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0])]
    run = tmp_path / "alpha-ce"
    run.mkdir()
    config = {"editor": {"name": "alphaedit"}, "objective": {"name": "ce"}, "dataset": {"name": "counterfact-mend"},
              "sequence": 4, "batch": 2, "stream": {"curve_every": 0}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "summary.json").write_text(json.dumps(summarize(records)))
    table = CliRunner().invoke(app, ["table", str(run), "--markdown"])
    assert table.exit_code == 0, table.output
    assert "| run | batch 1 | batch 2 |" in table.output and "| alpha-ce (ce) | 0.00 | 100.00 |" in table.output
    report = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    page = (tmp_path / "report" / "report.md").read_text()
    assert "## Lifelong editing" in page and "| AlphaEdit, counterfact-mend, 4 edits | 0.00 | 100.00 |" in page


def test_case_avg_uses_the_metrics_a_case_has():
    base = [rec("a", rel=1.0, loc=0.5)]
    other = [rec("a", rel=1.0, loc=1.0)]
    assert paired_difference(base, other, "avg").mean == pytest.approx(25.0)


def fake_records(cases, seed, chunk=None):
    """Records with random metrics where each real case has probes (Rel. always; Por./Loc. only with probes)."""
    rng = random.Random(seed)
    records = []
    for i, case in enumerate(cases):
        post = {"rel": rng.random(), "gen": rng.random() if case.rephrases else None,
                "por": rng.random() if case.portability else None, "loc": rng.random() if case.locality else None}
        records.append({"case_id": case.case_id, "pre": {}, "post": post, "steps": 1, "edit_s": 0.0, "eval_s": 0.0,
                        **({"chunk": i // chunk} if chunk else {})})
    return records


@pytest.mark.parametrize("chunk", [None, 3])
def test_paired_avg_is_the_difference_of_the_rows_avg_when_cases_lack_metrics(chunk):
    """WikiData_recent records 6-11 have either portability or locality probes, never both: the mean of each
    case's own Avg. would differ from the table's Avg. (the mean of the metric columns). ΔAvg. must not."""
    cases = load_benchmark("wikidata-recent", limit=6, offset=6)
    assert {bool(c.portability) for c in cases} == {True, False} and not any(c.portability and c.locality
                                                                             for c in cases)
    base, other = fake_records(cases, 1, chunk), fake_records(cases, 2, chunk)
    diff = paired_differences(base, other, ["rel", "por", "loc", "avg"])
    rows = summarize(base), summarize(other)
    for metric in ("rel", "por", "loc", "avg"):
        assert diff[metric].mean == pytest.approx(rows[1][metric] - rows[0][metric], abs=0.0101)  # rounded rows
    naive = sum(case_avg(o) - case_avg(b) for b, o in zip(base, other, strict=True)) / len(cases)
    assert abs(100 * naive - diff["avg"].mean) > 1.0  # the definition the tables used to disagree with
    assert (diff["avg"].n, diff["avg"].cases, diff["avg"].unit) == ((2, 6, "chunk") if chunk else (6, 6, "case"))


def case_avg(record):
    present = [v for v in record["post"].values() if v is not None]
    return sum(present) / len(present)


def test_ablation_variants_switch_one_component_each():
    base = OverToneConfig(lam=0.3, n_sigma=1.0, epsilon=0.02)
    variants = {v.slug: v for v in ablation_variants(base, (0.03,))}
    assert list(variants) == ["ce", "overtone", "no-clip", "no-dyn", "no-chk", "no-flt", "overtone-clip-stop",
                              "tie-mix", "clip-value-zero", "clip-test-prob", "ce-stop-0.03"]
    assert variants["tie-mix"].overtone == OverToneConfig(lam=0.3, n_sigma=1.0, epsilon=0.02, tie="mix")
    assert variants["clip-value-zero"].overtone.clip_value == "zero"
    assert variants["clip-test-prob"].overtone.clip_test == "prob"
    assert variants["overtone-clip-stop"].editor_settings == {"stop_when_clipped": True}
    assert variants["no-clip"].overtone == OverToneConfig(lam=0.3, n_sigma=1.0, epsilon=0.02, clip=False)
    assert not variants["no-dyn"].overtone.dynamic and not variants["no-chk"].overtone.mode_check
    assert not variants["no-flt"].overtone.filter
    assert variants["ce-stop-0.03"].objective == "ce"
    assert variants["ce-stop-0.03"].editor_settings == {"stop_loss": 0.03}
    # above lambda 0.5 (or at 0.5 when ties keep the mixture) the mode check cannot fail: the study adds
    # OverTone and w/o chk where it can; at 0.5 with ties falling back it acts, on ties
    for high in (OverToneConfig(lam=0.6), OverToneConfig(lam=0.5, tie="mix")):
        assert [v.slug for v in ablation_variants(high, chk_lambda=0.1)][-2:] == ["overtone-l0.1", "no-chk-l0.1"]
    assert "overtone-l0.1" not in [v.slug for v in ablation_variants(OverToneConfig(lam=0.5), chk_lambda=0.1)]
    grid = sweep_variants(base, [0.1, 0.5], [1.0], [0.0, 0.01])
    assert len(grid) == 5 and grid[0].objective == "ce" and grid[-1].overtone.lam == 0.5


def test_matched_steps_controls_follow_only_full_overtone_rows_that_stopped_early():
    base = OverToneConfig(lam=0.5)
    variants = ablation_variants(base)
    records = {v.slug: [{"case_id": "a", "steps": 3, "stopped_early": v.slug in ("overtone-clip-stop", "no-clip")}]
               for v in variants}
    (control,) = matched_steps_variants(variants, records)  # w/o clip stopped early too, but is an ablation
    assert (control.slug, control.objective, control.match_steps) == (
        "ce-steps-of-overtone-clip-stop", "ce", "overtone-clip-stop")


def run_dirs(out):
    """The run directory of every row of a study directory that has one, by the row's slug."""
    plan = json.loads((out / "plan.json").read_text())
    return {c["variant"]: out / c["dir"] for c in plan["cells"] if (out / c["dir"] / "config.yaml").exists()}


def test_ablate_runs_every_variant_and_prints_paired_tables(tmp_path, tiny_llama_dir):
    out = tmp_path / "ablation"
    result = CliRunner().invoke(app, [
        "ablate", "--editor", "ft-m", "--limit", "2", "--out", str(out), "--model", str(tiny_llama_dir),
        "--device", "cpu", "--steps", "3", "--stop-grid", "0.03", "--lambda", "0.3", "--epsilon", "1e6"])
    assert result.exit_code == 0, result.output
    runs = run_dirs(out)  # one run directory per row that ran; "CE, steps of OverTone" was not needed
    assert sorted(runs) == sorted(
        ["ce", "overtone", "no-clip", "no-dyn", "no-chk", "no-flt", "overtone-clip-stop", "tie-mix", "clip-value-zero",
         "clip-test-prob", "ce-stop-0.03", "ce-steps-of-overtone-clip-stop",
         "ce-steps-of-clip-value-zero"])  # clipped tokens at 0: FT-M's loss stop fires, so it gets a control
    table = (out / "table.md").read_text()
    assert "| w/o flt |" in table and "W/T/L (Avg.)" in table and "CE stop<0.03" in table
    assert "CE, steps of OverTone, stop when clipped" in table
    # epsilon 1e6 clips every token: the host loop runs all 3 steps, the clipped stop none, its control none
    steps = {slug: [r["steps"] for r in read_run(runs[slug])[1]]
             for slug in ("overtone", "overtone-clip-stop", "ce-steps-of-overtone-clip-stop")}
    assert steps == {"overtone": [3, 3], "overtone-clip-stop": [0, 0], "ce-steps-of-overtone-clip-stop": [0, 0]}
    config = read_run(runs["ce-steps-of-overtone-clip-stop"])[0]
    assert config["matched_steps"] == "overtone-clip-stop" and config["objective"]["name"] == "ce"


def test_sweep_warns_when_tuning_on_reported_cases(tmp_path, tiny_llama_dir, caplog):
    result = CliRunner().invoke(app, [
        "sweep", "--editor", "ft-m", "--offset", "0", "--limit", "1", "--out", str(tmp_path / "s"),
        "--model", str(tiny_llama_dir), "--device", "cpu", "--steps", "1", "--lambdas", "0.5",
        "--n-sigmas", "1", "--epsilons", "0"])
    assert result.exit_code == 0, result.output
    assert "not reportable" in caplog.text or "not reportable" in result.output
    bad = CliRunner().invoke(app, ["sweep", "--out", str(tmp_path / "t"), "--lambdas", "a,b",
                                   "--model", str(tiny_llama_dir)])
    assert bad.exit_code == 2 and "--lambdas takes comma-separated numbers" in bad.output


def test_the_sweep_grid_takes_the_tie_rule_as_an_axis():
    grid = sweep_variants(OverToneConfig(lam=0.5), [0.5], [1.0, 2.0], [0.01], ["fallback", "mix"])
    assert [v.slug for v in grid] == ["ce", "ot-l0.5-n1-e0.01-fallback", "ot-l0.5-n1-e0.01-mix",
                                      "ot-l0.5-n2-e0.01-fallback", "ot-l0.5-n2-e0.01-mix"]
    assert grid[2].overtone.tie == "mix" and grid[1].overtone.tie == "fallback"
    assert [v.slug for v in sweep_variants(OverToneConfig(), [0.1], [1.0], [0.01])] == ["ce", "ot-l0.1-n1-e0.01"]
