"""The command line on a tiny local checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import typer
import yaml
from typer.testing import CliRunner

from overtone.benchmarks import DATA_DIR
from overtone.cli import app
from overtone.cli.options import EditorOptions, ModelOptions, OptionGroup, SeedOpt, grouped

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


def test_table_pairs_runs_with_the_first_run_of_their_table(tmp_path, tiny_llama_dir):
    base = ["bench", "--dataset", "zsre", "--limit", "3", "--model", str(tiny_llama_dir), "--device", "cpu",
            "--layer", "2", "--steps", "2"]
    ce, ot = tmp_path / "ce", tmp_path / "ot"
    assert runner.invoke(app, [*base, "--objective", "ce", "--out", str(ce)]).exit_code == 0
    assert runner.invoke(app, [*base, "--objective", "overtone", "--out", str(ot)]).exit_code == 0
    result = runner.invoke(app, ["table", str(ce), str(ot), "--markdown", "--paired"])
    assert result.exit_code == 0, result.output
    assert "Paired differences to ce (ce)" in result.output
    row = next(line for line in result.output.splitlines() if line.startswith("| ot (overtone) |") and "±" in line)
    assert row.rstrip().endswith("| 3 |")  # the three cases were paired, on one line
    assert "5 comparisons; † significant after Holm's correction" in result.output
    alone = runner.invoke(app, ["table", str(ce), "--markdown", "--paired"])
    assert alone.exit_code == 0 and "Paired" not in alone.output


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
    assert result.exit_code == 2 and "editor setting layer=7: model" in result.output
    assert "has 4 layers, so a layer is 0..3" in result.output
    result = runner.invoke(app, [*base, "--model", str(tiny_llama_dir), "--objective", "kl"])
    assert result.exit_code == 2 and "unknown objective 'kl'" in result.output
    result = runner.invoke(app, [*base, "--model", str(tiny_llama_dir), "--dataset", "nope"])
    assert result.exit_code == 2 and "unknown dataset 'nope'" in result.output
    result = runner.invoke(app, [*base, "--model", str(tiny_llama_dir), "--lambda", "2"])
    assert result.exit_code == 2 and "lam must lie in [0, 1]" in result.output
    assert not (tmp_path / "r").exists()  # no refused run leaves a directory


def test_edit_prints_completions_before_and_after(tiny_llama_dir):
    result = runner.invoke(app, ["edit", "--prompt", "The capital of Italy is", "--target", "Mary",
                                 "--locality", "Who?", "--model", str(tiny_llama_dir), "--device", "cpu",
                                 "--steps", "3", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "before" in result.output and "locality" in result.output
    result = runner.invoke(app, ["edit", "--prompt", "The capital of Italy is", "--target", " ",
                                 "--model", str(tiny_llama_dir), "--device", "cpu"])
    assert result.exit_code == 2 and "empty target" in result.output


def test_continual_bench_writes_its_protocol_and_tables_group_by_dataset(tmp_path, tiny_llama_dir):
    base = ["--model", str(tiny_llama_dir), "--device", "cpu", "--layer", "2", "--steps", "2", "--objective", "ce"]
    cont = tmp_path / "cont"
    result = runner.invoke(app, ["bench", *base, "--dataset", "wikibio", "--limit", "4", "--sequence", "2",
                                 "--eval-timing", "after-each", "--out", str(cont)])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((cont / "config.yaml").read_text())
    assert (config["protocol"], config["sequence"], config["eval_timing"]) == ("continual", 2, "after-each")
    assert "wikibio, continual T=2, evaluated after each edit" in result.output
    summary = json.loads((cont / "summary.json").read_text())
    assert summary["n_chunks"] == 2 and summary["gen"] is None and summary["por"] is None
    single = tmp_path / "single"
    assert runner.invoke(app, ["bench", *base, "--limit", "1", "--out", str(single)]).exit_code == 0
    assert yaml.safe_load((single / "config.yaml").read_text())["protocol"] == "single"
    result = runner.invoke(app, ["table", str(cont), str(single), "--markdown"])
    assert result.exit_code == 0, result.output
    assert "wikibio, continual T=2" in result.output and "zsre, single editing" in result.output
    assert "| run | Rel. | Loc. | Avg. | cases |" in result.output  # WikiBio: no Gen. or Por. column
    assert "| run | Rel. | Gen. | Por. | Loc. | Avg. | cases |" in result.output


def test_dataset_files_mquake_options_and_their_errors(tmp_path, tiny_llama_dir):
    base = ["bench", "--model", str(tiny_llama_dir), "--device", "cpu", "--layer", "2", "--steps", "1",
            "--objective", "ce", "--limit", "1"]
    records = json.loads((DATA_DIR / "mquake" / "MQuAKE-hard.json").read_text())[:1]
    path = tmp_path / "hard.json"
    path.write_text(json.dumps(records))
    out = tmp_path / "mq"
    result = runner.invoke(app, [*base, "--dataset", str(path), "--out", str(out), "--single-hop-tokens", "2",
                                 "--multi-hop-tokens", "3", "--multi-hop-questions", "1"])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["dataset"] == {"name": "hard", "offset": 0, "path": str(path.resolve()), "format": "mquake"}
    assert config["evaluation"]["generation"]["multi_hop_tokens"] == 3
    assert "Sng-Hop" in result.output and "Mlt-Hop" in result.output
    (record,) = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert record["case_id"] == "hard/0" and len(record["generations"]) == 5
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "z"), "--multi-hop-tokens", "3"])
    assert result.exit_code == 2 and "generation settings apply only to generation-based benchmarks" in result.output
    unknown = tmp_path / "qa.json"
    unknown.write_text(json.dumps([{"question": "q", "answer": "a"}]))
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "u"), "--dataset", str(unknown)])
    assert result.exit_code == 2 and "unknown dataset format" in result.output
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "t"), "--eval-timing", "later", "--sequence", "2"])
    assert result.exit_code == 2 and "unknown --eval-timing 'later'" in result.output


def test_datasets_lists_benchmarks_and_formats():
    result = runner.invoke(app, ["datasets"])
    assert result.exit_code == 0
    assert all(name in result.output for name in ("wikidata-recent", "wikibio", "zsre-mend", "mquake"))
    assert "counterfact-mend" in result.output and "SOURCES.md" in result.output



@dataclass(frozen=True)
class Outer(OptionGroup):
    editing: EditorOptions = field(default_factory=EditorOptions)
    seed: SeedOpt = 0


def test_an_option_group_is_one_parameter_with_its_options_in_its_place():
    seen = []
    demo = typer.Typer()

    @demo.command()
    @grouped
    def show(*, model: ModelOptions, name: str = "x", outer: Outer) -> None:
        seen.append((model, name, outer))

    result = runner.invoke(demo, ["--model", "m", "--threads", "2", "--steps", "5", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert seen == [(ModelOptions(model="m", threads=2), "x", Outer(EditorOptions(steps=5), 3))]
    help_text = runner.invoke(demo, ["--help"], env={"COLUMNS": "200"}).output
    flags = ["--model", "--device", "--dtype", "--threads", "--name", "--layer", "--lr", "--steps", "--seed"]
    assert sorted(flags, key=help_text.index) == flags  # each group's options stand where the group does

    def clash(*, model: str = "", group: ModelOptions) -> None:
        """``--model`` twice."""

    with pytest.raises(TypeError, match="options named twice: model"):
        grouped(clash)
