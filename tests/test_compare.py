"""Variants of a study, paired statistics, and the ablate / sweep commands."""

from __future__ import annotations

import math

import pytest
from scipy import stats
from typer.testing import CliRunner

from overtone.cli import app
from overtone.objectives import OverToneConfig
from overtone.report import paired_difference
from overtone.runner.variants import ablation_variants, sweep_variants


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


def test_case_avg_uses_the_metrics_a_case_has():
    base = [rec("a", rel=1.0, loc=0.5)]
    other = [rec("a", rel=1.0, loc=1.0)]
    assert paired_difference(base, other, "avg").mean == pytest.approx(25.0)


def test_ablation_variants_switch_one_component_each():
    base = OverToneConfig(lam=0.3, n_sigma=1.0, epsilon=0.02)
    variants = {v.slug: v for v in ablation_variants(base, (0.03,))}
    assert list(variants) == ["ce", "overtone", "no-clip", "no-dyn", "no-chk", "no-flt", "ce-stop-0.03"]
    assert variants["no-clip"].overtone == OverToneConfig(lam=0.3, n_sigma=1.0, epsilon=0.02, clip=False)
    assert not variants["no-dyn"].overtone.dynamic and not variants["no-chk"].overtone.mode_check
    assert not variants["no-flt"].overtone.filter
    assert variants["ce-stop-0.03"].objective == "ce"
    assert variants["ce-stop-0.03"].editor_settings == {"stop_loss": 0.03}
    grid = sweep_variants(base, [0.1, 0.5], [1.0], [0.0, 0.01])
    assert len(grid) == 5 and grid[0].objective == "ce" and grid[-1].overtone.lam == 0.5


def test_ablate_runs_every_variant_and_prints_paired_tables(tmp_path, tiny_llama_dir):
    out = tmp_path / "ablation"
    result = CliRunner().invoke(app, [
        "ablate", "--editor", "ft-m", "--limit", "2", "--out", str(out), "--model", str(tiny_llama_dir),
        "--device", "cpu", "--steps", "2", "--stop-grid", "0.03"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(
        ["ce", "overtone", "no-clip", "no-dyn", "no-chk", "no-flt", "ce-stop-0.03"])
    table = (out / "table.md").read_text()
    assert "| w/o flt |" in table and "W/T/L (Avg.)" in table and "CE stop<0.03" in table


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
