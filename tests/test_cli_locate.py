"""``overtone stats`` and ROME/MEMIT through ``overtone bench`` / ``overtone edit`` on a tiny local checkpoint."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from overtone.cli import app

runner = CliRunner()
QUICK = ["--steps", "3", "--set", "context_lengths=4,2"]


@pytest.fixture
def corpus(tmp_path, monkeypatch, zsre_cases):
    monkeypatch.setenv("OVERTONE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"{c.prompt} {c.target}." for c in zsre_cases))
    return str(path)


def test_stats_computes_once_then_reads_the_cache(tiny_llama_dir, corpus):
    args = ["stats", "--model", str(tiny_llama_dir), "--device", "cpu", "--layers", "1,2", "--corpus", corpus,
            "--max-tokens", "32"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.output.count("computed") == 2
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and again.output.count("cache") >= 2 and "computed" not in again.output
    bad = runner.invoke(app, [*args[:-4], "--corpus", "no-such-corpus"])
    assert bad.exit_code == 2 and "unknown corpus 'no-such-corpus'" in bad.output
    bad = runner.invoke(app, ["stats", "--model", str(tiny_llama_dir), "--device", "cpu", "--layers", "9"])
    assert bad.exit_code == 2 and "out of range" in bad.output


def test_bench_runs_rome_and_memit(tmp_path, tiny_llama_dir, corpus):
    base = ["bench", "--dataset", "zsre", "--limit", "2", "--model", str(tiny_llama_dir), "--device", "cpu", *QUICK]
    rome = runner.invoke(app, [*base, "--editor", "rome", "--objective", "ce", "--layer", "1",
                               "--set", "mom2_adjustment=false", "--out", str(tmp_path / "rome")])
    assert rome.exit_code == 0, rome.output
    config = yaml.safe_load((tmp_path / "rome" / "config.yaml").read_text())
    assert config["editor"]["name"] == "rome" and config["editor"]["layer"] == 1
    assert config["editor"]["mom2_adjustment"] is False and len(config["editor"]["context_prefixes"]) == 3
    assert config["editor"]["context_lengths"] == [[4, 2]]
    memit = runner.invoke(app, [*base, "--editor", "memit", "--objective", "overtone", "--set", "layers=1,2",
                                "--set", f"mom2_corpus={corpus}", "--out", str(tmp_path / "memit")])
    assert memit.exit_code == 0, memit.output
    summary = json.loads((tmp_path / "memit" / "summary.json").read_text())
    assert summary["n_cases"] == 2
    config = yaml.safe_load((tmp_path / "memit" / "config.yaml").read_text())
    assert config["editor"]["layers"] == [1, 2] and config["objective"]["name"] == "overtone"
    sequence = runner.invoke(app, [*base[:-2], "--editor", "memit", "--objective", "ce", "--set", "layers=1,2",
                                   "--set", f"mom2_corpus={corpus}", "--sequence", "2", "--batch", "2",
                                   "--set", "context_lengths=4,1;3,1", "--out", str(tmp_path / "memit-batch")])
    assert sequence.exit_code == 0, sequence.output
    assert "batch editing B=2, T=2" in sequence.output
    config = yaml.safe_load((tmp_path / "memit-batch" / "config.yaml").read_text())
    assert config["protocol"] == "batch" and config["batch"] == 2
    assert config["editor"]["context_lengths"] == [[4, 1], [3, 1]]
    too_big = runner.invoke(app, [*base, "--editor", "memit", "--sequence", "2", "--batch", "3",
                                  "--out", str(tmp_path / "memit-big")])
    assert too_big.exit_code == 2 and "--batch 3 needs --sequence >= 3" in too_big.output


def test_clear_errors_for_editor_settings(tmp_path, tiny_llama_dir):
    base = ["bench", "--limit", "1", "--out", str(tmp_path / "r"), "--device", "cpu", "--model", str(tiny_llama_dir)]
    result = runner.invoke(app, [*base, "--editor", "memit", "--layer", "2"])
    assert result.exit_code == 2 and "editor 'memit' has no setting(s) layer" in result.output
    result = runner.invoke(app, [*base, "--editor", "rome", "--set", "mom2"])
    assert result.exit_code == 2 and "expected KEY=VALUE with KEY one of" in result.output
    result = runner.invoke(app, [*base, "--editor", "rome", "--layer", "1", "--set", "layer=2"])
    assert result.exit_code == 2 and "layer is already set" in result.output
    result = runner.invoke(app, [*base, "--editor", "rome", "--set", "missing_subject=guess"])
    assert result.exit_code == 2 and "missing_subject must be one of" in result.output


def test_edit_with_rome_needs_a_subject_it_can_find(tiny_llama_dir):
    args = ["edit", "--editor", "rome", "--prompt", "The capital of Italy is", "--target", "Mary", "--model",
            str(tiny_llama_dir), "--device", "cpu", "--max-new-tokens", "2", "--layer", "1",
            "--set", "mom2_adjustment=false", *QUICK]
    result = runner.invoke(app, [*args, "--subject", "Italy"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*args, "--subject", "France"])
    assert result.exit_code == 2 and "subject 'France' does not occur in the prompt" in result.output
