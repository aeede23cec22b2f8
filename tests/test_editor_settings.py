"""WISE and MELO from the command line: ``overtone bench`` with ``--set`` settings."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from overtone.cli import app

runner = CliRunner()


@pytest.mark.parametrize("editor, settings", [
    ("wise", ["preset=llama-2-7b", "layer=2", "threshold_scale=0.6", "alpha=0.5", "beta=2", "gamma=1"]),
    ("melo", ["init_radius=0.001", "layers=2,3"]),
])
def test_bench_runs_a_memory_editor(tmp_path, tiny_llama_dir, editor, settings):
    out = tmp_path / "run"
    args = ["bench", "--editor", editor, "--objective", "overtone", "--limit", "2", "--out", str(out),
            "--model", str(tiny_llama_dir), "--device", "cpu", "--steps", "3"]
    for setting in settings:
        args += ["--set", setting]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["n_cases"] == 2
    config = (out / "config.yaml").read_text()
    assert f"name: {editor}" in config and "steps: 3" in config
    assert ("threshold_scale: 0.6" in config) if editor == "wise" else ("init_radius: 0.001" in config)


def test_bench_runs_a_sequence_with_a_memory_editor(tmp_path, tiny_llama_dir):
    out = tmp_path / "run"
    result = runner.invoke(app, ["bench", "--editor", "melo", "--objective", "ce", "--limit", "4", "--sequence", "2",
                                 "--out", str(out), "--model", str(tiny_llama_dir), "--device", "cpu", "--steps", "3",
                                 "--set", "init_radius=0.001", "--set", "layers=2,3"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["n_cases"] == 4


def test_bench_explains_bad_settings(tmp_path, tiny_llama_dir):
    base = ["bench", "--limit", "1", "--out", str(tmp_path / "r"), "--device", "cpu", "--model", str(tiny_llama_dir)]
    result = runner.invoke(app, [*base, "--editor", "melo"])
    assert result.exit_code == 2 and "set init_radius" in result.output
    result = runner.invoke(app, [*base, "--editor", "melo", "--set", "radius=3"])
    assert result.exit_code == 2 and "KEY one of preset, layers" in result.output
    result = runner.invoke(app, [*base, "--editor", "melo", "--layer", "2", "--set", "init_radius=1"])
    assert result.exit_code == 2 and "has no setting(s) layer" in result.output
