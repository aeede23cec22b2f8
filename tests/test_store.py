"""Run directories: one writer at a time, and every kind of damaged ``cases.jsonl`` a kill (or a person) can leave."""

from __future__ import annotations

import json
import logging

import pytest
from typer.testing import CliRunner

from overtone.cli import app
from overtone.runner import ResultStore, StoreError, read_run, summarize
from overtone.runner.store import CASES_FILE, LOCK_FILE, RunLock

CONFIG = {"editor": {"name": "ft-m"}, "objective": {"name": "ce"}, "limit": 3, "threads": 1}


def record(case_id: str, rel: float = 1.0) -> dict:
    return {"case_id": case_id, "pre": {"rel": 0.0}, "post": {"rel": rel, "loc": 1.0}, "steps": 2, "edit_s": 0.1,
            "eval_s": 0.1, "losses": [2.0, 1.0], "diverged": False}


def line(case_id: str, rel: float = 1.0) -> bytes:
    return (json.dumps(record(case_id, rel)) + "\n").encode()


def run_dir(tmp_path, body: bytes):
    """A run directory as a finished (and released) run leaves it, with ``body`` as its cases file."""
    ResultStore(tmp_path, CONFIG).close()
    (tmp_path / CASES_FILE).write_bytes(body)
    return tmp_path / CASES_FILE


# ---------------------------------------------------------------------------------------------- one writer


def test_a_second_writer_is_refused_naming_the_holder_and_readers_need_no_lock(tmp_path):
    with ResultStore(tmp_path, CONFIG) as store:
        store.append(record("zsre/0"))
        with pytest.raises(StoreError, match=r"is being written by another run \(pid \d+ on host .+, started 20"):
            ResultStore(tmp_path, CONFIG)
        config, records, _ = read_run(tmp_path)  # a reader while the writer holds the lock
        assert config["editor"] == {"name": "ft-m"} and [r["case_id"] for r in records] == ["zsre/0"]
    with ResultStore(tmp_path, CONFIG) as store:  # released: the next run may write
        assert store.done == {"zsre/0"}
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a clean release empties the lock file


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    # What a process killed while holding the lock leaves: the file names it, but the kernel freed its flock.
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "2020-01-01T00:00:00",
                                                  "command": "overtone bench"}))
    with caplog.at_level(logging.WARNING, logger="overtone"), RunLock(tmp_path) as lock:
        assert lock.held and json.loads((tmp_path / LOCK_FILE).read_text())["pid"] != 999999
    assert "taking over the lock of a run that ended without releasing it (pid 999999 on host gone" in caplog.text


def test_bench_refuses_a_held_directory_before_loading_the_model_and_table_still_reads(tmp_path, tiny_llama_dir):
    out = tmp_path / "run"
    runner = CliRunner()
    base = ["--model", str(tiny_llama_dir), "--device", "cpu", "--layer", "2", "--steps", "1", "--limit", "1"]
    assert runner.invoke(app, ["bench", *base, "--out", str(out)]).exit_code == 0
    with RunLock(out):
        result = runner.invoke(app, ["bench", *base, "--out", str(out)])
        assert result.exit_code == 2 and "is being written by another run (pid" in result.output
        assert runner.invoke(app, ["table", str(out)]).exit_code == 0


# ---------------------------------------------------------------------------------------------- the writer


def test_writer_cuts_a_partial_last_line_and_keeps_every_record(tmp_path, caplog):
    path = run_dir(tmp_path, line("a") + line("b") + b'{"case_id": "c", "pre": {"re')
    with caplog.at_level(logging.WARNING, logger="overtone"), ResultStore(tmp_path, CONFIG) as store:
        assert [r["case_id"] for r in store.records] == ["a", "b"]
        store.append(record("c"))
    assert path.read_bytes() == line("a") + line("b") + line("c")
    assert "removed a partial last line (28 bytes)" in caplog.text


def test_writer_restores_a_missing_final_newline_and_never_glues(tmp_path, caplog):
    path = run_dir(tmp_path, line("a") + line("b").rstrip(b"\n"))  # killed between the record and its newline
    with caplog.at_level(logging.WARNING, logger="overtone"), ResultStore(tmp_path, CONFIG) as store:
        assert store.done == {"a", "b"}
        store.append(record("c"))
    assert path.read_bytes() == line("a") + line("b") + line("c")
    assert "restored the missing newline" in caplog.text


def test_writer_cuts_a_tail_of_zero_bytes(tmp_path):
    path = run_dir(tmp_path, line("a") + b"\0" * 4096)  # what a power loss can leave after delayed allocation
    with ResultStore(tmp_path, CONFIG) as store:
        assert store.done == {"a"}
    assert path.read_bytes() == line("a")


@pytest.mark.parametrize("bad, problem", [
    (b'{"case_id": "b", "pre": {"rel"\n', "not valid JSON"),
    (b'\xff\xfe garbage\n', "not valid JSON"),
    (b'["a", "list"]\n', "not a case record"),
    (b'{"post": {"rel": 1.0}}\n', "not a case record"),
])
def test_writer_stops_at_a_damaged_middle_line_and_leaves_the_file_alone(tmp_path, bad, problem):
    body = line("a") + bad + line("c")
    path = run_dir(tmp_path, body)
    with pytest.raises(StoreError, match=rf"cases.jsonl: line 2 is damaged: {problem}.*left as it is"):
        ResultStore(tmp_path, CONFIG)
    assert path.read_bytes() == body
    assert not RunLock(tmp_path).holder()  # the refused store released its lock


def test_blank_lines_are_ignored(tmp_path):
    run_dir(tmp_path, line("a") + b"\n  \n" + line("b"))
    with ResultStore(tmp_path, CONFIG) as store:
        assert store.done == {"a", "b"}


def test_identical_duplicates_count_once_and_different_ones_are_refused(tmp_path, caplog):
    run_dir(tmp_path, line("a") + line("b") + line("a"))
    with caplog.at_level(logging.WARNING, logger="overtone"), ResultStore(tmp_path, CONFIG) as store:
        assert [r["case_id"] for r in store.records] == ["a", "b"]
        assert summarize(store.records)["n_cases"] == 2
        with pytest.raises(StoreError, match="case\\(s\\) b would be stored twice"):
            store.append(record("b"))
    assert "1 identical duplicate record(s) counted once: a (lines 1 and 3)" in caplog.text
    body = line("a") + line("b") + line("a", rel=0.0)  # two runs wrote one directory
    path = run_dir(tmp_path, body)
    with pytest.raises(StoreError, match="lines 1 and 3 hold different results for case a"):
        ResultStore(tmp_path, CONFIG)
    assert path.read_bytes() == body


def test_a_damaged_config_is_named(tmp_path):
    ResultStore(tmp_path, CONFIG).close()
    (tmp_path / "config.yaml").write_text("editor: {name: [")
    with pytest.raises(StoreError, match=r"config\.yaml: not valid YAML"):
        ResultStore(tmp_path, CONFIG)
    with pytest.raises(StoreError, match=r"config\.yaml: not valid YAML"):
        read_run(tmp_path)


# ---------------------------------------------------------------------------------------------- readers


def test_readers_skip_what_is_not_a_record_with_a_warning_and_change_nothing(tmp_path, caplog):
    body = line("a") + b"{broken\n" + line("b") + line("b") + b'{"case_id": "c", "po'
    path = run_dir(tmp_path, body)
    with caplog.at_level(logging.WARNING, logger="overtone"):
        _, records, _ = read_run(tmp_path)
    assert [r["case_id"] for r in records] == ["a", "b"]
    assert path.read_bytes() == body
    assert "skipped line 2: not valid JSON" in caplog.text
    assert "skipped an unfinished last line (20 bytes)" in caplog.text
    assert "1 identical duplicate record(s) counted once: b (lines 3 and 4)" in caplog.text
    other = tmp_path / "other"
    other.mkdir()
    run_dir(other, line("a") + line("a", rel=0.5))
    with pytest.raises(StoreError, match="lines 1 and 2 hold different results for case a"):
        read_run(other)


def test_paired_tables_count_a_duplicated_case_once(tmp_path):
    ce, ot = tmp_path / "ce", tmp_path / "ot"
    ce.mkdir()
    ot.mkdir()
    run_dir(ce, line("a", 0.0) + line("b", 0.0))
    run_dir(ot, line("a", 1.0) + line("b", 1.0) + line("b", 1.0))
    result = CliRunner().invoke(app, ["table", str(ce), str(ot), "--markdown", "--paired"])
    assert result.exit_code == 0, result.output
    assert "| ot (ce) | 100.00 | 100.00 | 100.00 | 2 |" in result.output  # the summary counts two cases
    row = next(x for x in result.output.splitlines() if x.startswith("| ot (ce) |") and "no interval" in x)
    assert "(no interval: 2 cases)" in row  # two cases paired, not three
    assert row.rstrip().endswith("| 2/0/0 | 2 |")
