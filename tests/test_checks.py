"""Check before you spend (record errors before the model and the statistics), length limits, and diverged edits."""

from __future__ import annotations

import json
import logging
import time

import pytest
import yaml
from typer.testing import CliRunner

from overtone.benchmarks import DATA_DIR, load_benchmark
from overtone.cli import app
from overtone.editors.base import fit_length
from overtone.report.runs import RunInfo
from overtone.report.tables import runs_table, single_editing_table, to_markdown
from overtone.runner.bench import FLAT, divergence
from overtone.stats import MomentSpec, second_moments

runner = CliRunner()
ZSRE = DATA_DIR / "knowedit" / "ZsRE" / "ZsRE-test-all.json"


def dataset(tmp_path, change) -> str:
    """The first three ZsRE records with ``change(records)`` applied, as a dataset file."""
    records = json.loads(ZSRE.read_text())[:3]
    change(records)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return str(path)


@pytest.mark.parametrize("editor", ["rome", "memit"])
def test_a_subject_missing_from_its_prompt_fails_before_the_model_and_the_statistics(tmp_path, tokenizer_only,
                                                                                     monkeypatch, editor):
    monkeypatch.setenv("OVERTONE_CACHE", str(tmp_path / "cache"))
    data = dataset(tmp_path, lambda r: r[2].update(subject="Nobody In Particular"))
    out = tmp_path / "run"
    start = time.monotonic()
    result = runner.invoke(app, ["bench", "--editor", editor, "--objective", "ce", "--dataset", data, "--model",
                                 str(tokenizer_only), "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "case data/2: subject 'Nobody In Particular' does not occur in the prompt" in result.output
    assert time.monotonic() - start < 30  # seconds, not the minutes of the statistics
    assert not (tmp_path / "cache").exists() and not out.exists()  # no statistics, no run directory


def test_an_over_long_input_is_refused_naming_the_record_and_its_length(tmp_path, tokenizer_only):
    data = dataset(tmp_path, lambda r: r[1].update(target_new="a very long answer " * 330))  # ~6,000 characters
    result = runner.invoke(app, ["bench", "--dataset", data, "--model", str(tokenizer_only), "--device", "cpu",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "case data/1: prompt + target has" in result.output and "more than ft-m's max_length 512" in result.output
    assert "--truncate" in result.output


def test_truncate_keeps_the_first_max_length_tokens(tokenizer):
    case = load_benchmark("zsre", limit=1)[0]
    length = len(tokenizer(f"{case.prompt} {case.target}")["input_ids"])
    prompt_length = len(tokenizer(case.prompt)["input_ids"])
    limit = prompt_length + 2
    assert length > limit
    assert fit_length(tokenizer, case, length, False, "ft-m") is case
    with pytest.raises(ValueError, match=f"case zsre/0: prompt \\+ target has {length} tokens, more than ft-m's "
                                         f"max_length {limit}; raise it"):
        fit_length(tokenizer, case, limit, False, "ft-m")
    cut = fit_length(tokenizer, case, limit, True, "ft-m")
    assert cut.prompt == case.prompt and case.target.startswith(cut.target) and cut.target != case.target
    assert len(tokenizer(f"{cut.prompt} {cut.target}")["input_ids"]) <= limit
    assert cut.rephrases == case.rephrases and cut.locality == case.locality
    with pytest.raises(ValueError, match="the prompt alone fills it"):
        fit_length(tokenizer, case, prompt_length - 1, True, "ft-m")
    bundle = load_benchmark("mquake", limit=1)[0]  # four rewrites: each is checked and cut
    limit = max(len(tokenizer(e.prompt)["input_ids"]) for e in bundle.edits) + 1
    cut = fit_length(tokenizer, bundle, limit, True, "rome")
    assert len(cut.edits) == 4 and cut.edits != bundle.edits
    assert all(len(tokenizer(f"{e.prompt} {e.target}")["input_ids"]) <= limit for e in cut.edits)


def test_bench_truncates_on_request_and_records_it(tmp_path, tiny_llama_dir):
    base = ["bench", "--limit", "2", "--model", str(tiny_llama_dir), "--device", "cpu", "--layer", "2", "--steps",
            "2", "--set", "max_length=25"]  # zsre/0 has 29 tokens (22 of them the prompt), zsre/1 has 20
    refused = runner.invoke(app, [*base, "--out", str(tmp_path / "refused")])
    assert refused.exit_code == 2 and "case zsre/0: prompt + target has" in refused.output
    result = runner.invoke(app, [*base, "--truncate", "--out", str(tmp_path / "cut")])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((tmp_path / "cut" / "config.yaml").read_text())
    assert config["truncate"] is True and config["editor"]["max_length"] == 25


def test_statistics_say_how_long_they_take_and_that_they_are_cached(tiny_llama, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OVERTONE_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i} is about the city number {i} and its river." for i in range(40)))
    spec = MomentSpec(corpus=str(corpus), max_tokens=16)
    with caplog.at_level(logging.INFO, logger="overtone"):
        second_moments(tiny_llama, [1], spec, batch_tokens=64)
    assert "are not cached: computing them once" in caplog.text and "the result is cached in" in caplog.text
    assert "expected to take about" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="overtone"):
        second_moments(tiny_llama, [1], spec, batch_tokens=64)
    assert "not cached" not in caplog.text


def test_divergence_reads_the_objective_loss_and_the_flatness():
    assert divergence({"losses": [4.4, 2.0, 0.5], "flatness": 0.3}) is None
    assert divergence({"losses": [4.4], "flatness": 0.3}) is None  # stopped at once
    assert divergence({"losses": [4.4, 6.0, 10.8], "flatness": 0.3}) == "objective loss 4.4 -> 10.8"
    assert "objective loss 1 -> nan" in divergence({"losses": [1.0, float("nan")]})
    flat = divergence({"losses": [7.1, 6.0], "flatness": FLAT + 0.01})
    assert flat is not None and "flat" in flat
    bundle = {"losses": [[3.0, 1.0], [2.0, 2.5]], "flatness": 0.2}  # the second of two edits rose
    assert divergence(bundle) == "objective loss 2 -> 2.5"


def test_a_diverged_edit_is_flagged_counted_in_tables_and_strict_stops(tmp_path, tiny_llama_dir):
    base = ["bench", "--limit", "2", "--model", str(tiny_llama_dir), "--device", "cpu", "--layer", "2", "--steps",
            "5", "--objective", "ce"]
    result = runner.invoke(app, [*base, "--lr", "1e30", "--out", str(tmp_path / "wild")])
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (tmp_path / "wild" / "cases.jsonl").read_text().splitlines()]
    assert [r["diverged"] for r in records] == [True, True] and all(r["flatness"] > FLAT for r in records)
    assert json.loads((tmp_path / "wild" / "summary.json").read_text())["n_diverged"] == 2
    assert "2 (2 diverged)" in runner.invoke(app, ["table", str(tmp_path / "wild")]).output
    strict = runner.invoke(app, [*base, "--lr", "1e30", "--strict", "--out", str(tmp_path / "strict")])
    assert strict.exit_code == 2
    assert "case zsre/0: the edit diverged" in strict.output and "lr=1e+30" in strict.output
    assert not (tmp_path / "strict" / "cases.jsonl").exists()
    calm = runner.invoke(app, [*base, "--strict", "--out", str(tmp_path / "calm")])
    assert calm.exit_code == 0, calm.output
    assert json.loads((tmp_path / "calm" / "summary.json").read_text())["n_diverged"] == 0


def test_report_tables_name_the_diverged_edits(tmp_path):
    config = {"model": {"name": "m"}, "dataset": {"name": "zsre"}, "editor": {"name": "ft-m"},
              "objective": {"name": "ce"}, "protocol": "single"}
    summary = {"rel": 50.0, "avg": 50.0, "n_cases": 25, "n_diverged": 2}
    run = RunInfo(path=tmp_path / "wild", config=config, records=[], summary=summary)
    assert "diverged edits: FT-M 2" in single_editing_table([run]).caption
    assert "| 25 (2 diverged) |" in to_markdown(runs_table([run]))
    calm = RunInfo(path=tmp_path / "calm", config=config, records=[], summary={**summary, "n_diverged": 0})
    assert "diverged" not in single_editing_table([calm]).caption + to_markdown(runs_table([calm]))
