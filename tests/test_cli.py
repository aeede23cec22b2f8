"""The command line on a tiny local checkpoint."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from overtone.cli import app

runner = CliRunner()


def test_bench_writes_a_run_and_table_reads_it(tmp_path, tiny_llama_dir):
    out = tmp_path / "run"
    args = ["bench", "--editor", "ft-m", "--objective", "overtone", "--dataset", "zsre", "--limit", "2",
            "--out", str(out), "--model", str(tiny_llama_dir), "--device", "cpu", "--layer", "2", "--steps", "3",
            "--lambda", "0.3", "--n-sigma", "1.0", "--epsilon", "0.0", "--no-filter"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 2
    config = (out / "config.yaml").read_text()
    assert "lam: 0.3" in config and "filter: false" in config and "layer: 2" in config
    result = runner.invoke(app, ["table", str(out), "--markdown"])
    assert result.exit_code == 0 and "| run (overtone) |" in result.output


def test_bench_rejects_a_mismatched_restart(tmp_path, tiny_llama_dir):
    out = tmp_path / "run"
    base = ["bench", "--limit", "1", "--out", str(out), "--model", str(tiny_llama_dir), "--device", "cpu",
            "--steps", "2"]
    assert runner.invoke(app, [*base, "--objective", "ce"]).exit_code == 0
    result = runner.invoke(app, [*base, "--objective", "overtone"])
    assert result.exit_code == 2 and "another configuration" in result.output


def test_clear_errors_for_bad_options(tmp_path, tiny_llama_dir):
    base = ["bench", "--limit", "1", "--out", str(tmp_path / "r"), "--device", "cpu"]
    result = runner.invoke(app, [*base, "--model", str(tmp_path / "missing-model-dir")])
    assert result.exit_code == 2 and "could not load model" in result.output
    result = runner.invoke(app, [*base, "--model", str(tiny_llama_dir), "--layer", "7"])
    assert result.exit_code == 2 and "layer 7 is out of range for llama with 4 layers" in result.output
    result = runner.invoke(app, [*base, "--model", str(tiny_llama_dir), "--objective", "kl"])
    assert result.exit_code == 2 and "unknown objective 'kl'" in result.output
    result = runner.invoke(app, [*base, "--model", str(tiny_llama_dir), "--dataset", "nope"])
    assert result.exit_code == 2 and "unknown dataset 'nope'" in result.output
    result = runner.invoke(app, [*base, "--model", str(tiny_llama_dir), "--lambda", "2"])
    assert result.exit_code == 2 and "lam must lie in [0, 1]" in result.output


def test_edit_prints_completions_before_and_after(tiny_llama_dir):
    result = runner.invoke(app, ["edit", "--prompt", "The capital of Italy is", "--target", "Mary",
                                 "--locality", "Who?", "--model", str(tiny_llama_dir), "--device", "cpu",
                                 "--steps", "3", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "before" in result.output and "locality" in result.output
    result = runner.invoke(app, ["edit", "--prompt", "The capital of Italy is", "--target", " ",
                                 "--model", str(tiny_llama_dir), "--device", "cpu"])
    assert result.exit_code == 2 and "empty target" in result.output
