"""Input from the command line and from files, checked before the model loads and bounded; a fast start.

Settings must be finite and in range, layers must exist in the model's config.json, a damaged run directory
is refused on resume, a case holds a bounded number of probes, ``--limit`` and ``--parallel`` are checked;
each refusal comes before the model loads (the model folders here have no weights, or loading is made to
fail), leaves no run directory, and its advice works when followed. ``--help`` and a refused second writer
import no torch. Tables show a summary that matches the records.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from overtone.benchmarks import DatasetError, EditCase, Probe, load_benchmark
from overtone.benchmarks.bounds import bound_probes
from overtone.cli import app
from overtone.editors import make_editor
from overtone.editors import parallel as parallel_editing
from overtone.evaluation import WildSettings, wild
from overtone.evaluation.teacher_forced import Evaluator
from overtone.evaluation.wild import WildEvaluator
from overtone.objectives import CrossEntropy
from overtone.report.runs import checked_summary, read_run_info
from overtone.runner import RunSpec, SpecError, check_run, read_run, summarize
from overtone.runner import run as run_module
from overtone.runner.signals import Interrupted
from overtone.runner.store import CASES_FILE, SUMMARY_FILE, RunLock

SRC = Path(__file__).resolve().parent.parent / "src"
runner = CliRunner()


@pytest.fixture
def config_only(tokenizer_only, tiny_llama_dir) -> Path:
    """A model folder with a tokenizer and config.json but no weights: loading the model here fails."""
    shutil.copy(tiny_llama_dir / "config.json", tokenizer_only / "config.json")
    return tokenizer_only


def write_facts(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def started(*args: str) -> tuple[int, str, set[str]]:
    """Exit status, output and imported modules of ``python -X importtime -m overtone ARGS``."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "overtone", *args], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)
    modules = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    said = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    return proc.returncode, proc.stdout + "\n".join(said), modules


# ---------------------------------------------------------------------------------------------- fast start


@pytest.mark.parametrize("args", [["--help"], ["bench", "--help"], ["edit", "--help"], ["table", "--help"],
                                  ["study", "run", "--help"]])
def test_help_imports_no_torch(args):
    code, output, modules = started(*args)
    assert code == 0 and "Usage" in output
    assert "overtone.cli" in modules  # the import list was read
    assert not {"torch", "transformers", "peft", "matplotlib"} & modules


@pytest.mark.parametrize(("command", "held"), [("bench", ""), ("demo", "ft-m-overtone"), ("trace", "ce")])
def test_a_second_writer_is_refused_before_any_heavy_import(tmp_path, command, held):
    out = tmp_path / "run"
    lock = RunLock(out / held).acquire()
    try:
        code, output, modules = started(command, "--out", str(out), "--limit", "1")
    finally:
        lock.release()
    assert code == 2 and f"is being written by another run (pid {os.getpid()}" in output
    assert "torch" not in modules


# ---------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(("args", "said"), [
    (["--set", "lr=nan"], "--set 'lr=nan': expected a finite number, got 'nan'"),
    (["--lr", "inf"], "editor setting lr=inf: expected a finite number"),
    (["--n-sigma", "nan"], "OverTone setting n_sigma=nan: expected a finite number"),
    (["--set", "lr=-1"], "FT-M: lr must be > 0, got -1.0"),
    (["--set", "layer=99"], "editor setting layer=99: model"),
    (["--layer", "-1"], "editor setting layer=-1: model"),
    (["--limit", "0"], "--limit"),
    (["--max-probes", "0"], "--max-probes"),
    (["--probes", "some"], "'some': choose one of error, cut, sample"),
])
def test_a_bad_setting_is_refused_before_the_model_and_leaves_no_directory(tmp_path, config_only, args, said):
    out = tmp_path / "runs" / "run"
    result = runner.invoke(app, ["bench", "--model", str(config_only), "--device", "cpu", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert said in result.output and "could not load model" not in result.output
    assert not (tmp_path / "runs").exists()


def test_layers_are_named_with_the_model_s_layer_count(tmp_path, config_only):
    result = runner.invoke(app, ["bench", "--model", str(config_only), "--device", "cpu", "--out", str(tmp_path / "r"),
                                 "--editor", "lora", "--set", "layers=1,4"])
    assert result.exit_code == 2
    assert f"editor setting layers=4: model {config_only} has 4 layers, so a layer is 0..3" in result.output


def test_the_fixed_command_runs_on_the_out_a_refused_one_named(tmp_path, tiny_llama_dir):
    out = tmp_path / "run"
    base = ["bench", "--model", str(tiny_llama_dir), "--device", "cpu", "--limit", "1", "--layer", "2", "--steps", "1",
            "--out", str(out)]
    refused = runner.invoke(app, [*base, "--set", "lr=nan"])
    assert refused.exit_code == 2 and not out.exists()
    fixed = runner.invoke(app, [*base, "--set", "lr=1e-3"])
    assert fixed.exit_code == 0, fixed.output
    assert [r["case_id"] for r in read_run(out)[1]] == ["zsre/0"]


def test_a_run_the_lock_made_leaves_no_directory_when_it_wrote_nothing(tmp_path):
    fresh = tmp_path / "a" / "b"
    RunLock(fresh).acquire().release()
    assert not (tmp_path / "a").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    RunLock(kept).acquire().release()
    assert kept.is_dir()  # it was there before
    written = tmp_path / "written"
    lock = RunLock(written).acquire()
    (written / "config.yaml").write_text("seed: 0\n")
    lock.release()
    assert (written / "config.yaml").exists()


# ---------------------------------------------------------------------------------------------- a damaged run


def test_a_damaged_run_is_refused_before_the_model_and_the_advice_works(tmp_path, tiny_llama_dir, monkeypatch):
    out = tmp_path / "run"
    base = ["bench", "--model", str(tiny_llama_dir), "--device", "cpu", "--limit", "3", "--layer", "2", "--steps", "1",
            "--out", str(out)]
    assert runner.invoke(app, base).exit_code == 0
    lines = (out / CASES_FILE).read_bytes().splitlines(keepends=True)
    (out / CASES_FILE).write_bytes(lines[0] + b'{"case_id": "zsre/1", "post": \n' + lines[2])

    # the table shows the two readable records, not summary.json's three cases, and says so
    table = runner.invoke(app, ["table", str(out), "--markdown"])
    assert table.exit_code == 0, table.output
    assert f"{SUMMARY_FILE} covers 3 cases where cases.jsonl holds 2 readable records" in table.output
    assert read_run_info(out).summary["n_cases"] == 2

    with monkeypatch.context() as patched:
        def no_model(*args, **kwargs):
            raise AssertionError("the model was loaded")

        patched.setattr(run_module, "load_model", no_model)
        refused = runner.invoke(app, base)
    assert refused.exit_code == 2, refused.output
    assert "line 2 is damaged" in refused.output and "fix or remove that line, then rerun" in refused.output
    (out / CASES_FILE).write_bytes(lines[0] + lines[2])  # the advice: remove the line, rerun
    resumed = runner.invoke(app, base)
    assert resumed.exit_code == 0, resumed.output
    assert sorted(r["case_id"] for r in read_run(out)[1]) == ["zsre/0", "zsre/1", "zsre/2"]


def test_a_summary_of_other_cases_is_recomputed_from_the_records(tmp_path):
    records = [{"case_id": c, "pre": {"rel": 0.0}, "post": {"rel": rel}, "steps": 1, "edit_s": 0.1, "eval_s": 0.1}
               for c, rel in (("a", 1.0), ("b", 0.0))]
    saved = summarize(records)
    assert checked_summary(tmp_path, records, saved) == (saved, None)
    other = [{**records[0], "case_id": "c"}, records[1]]
    summary, warning = checked_summary(tmp_path, other, saved)
    assert summary["case_ids_sha256"] != saved["case_ids_sha256"]
    assert warning == (f"{tmp_path}: {SUMMARY_FILE} covers other case ids than the 2 readable records of cases.jsonl; "
                       "the summary shown is computed from those records")
    legacy = {k: v for k, v in saved.items() if k != "case_ids_sha256"}  # a summary written before the digest
    assert checked_summary(tmp_path, records, legacy) == (legacy, None)


# ---------------------------------------------------------------------------------------------- bounded inputs


def big_record(n: int) -> dict:
    return {"prompt": "The capital of France is", "target": "Rome",
            "paraphrases": [f"Version {i}: the capital of France is" for i in range(n)]}


def test_a_record_with_10000_paraphrases_is_refused_in_seconds_naming_it(tmp_path, config_only):
    data = write_facts(tmp_path / "facts.jsonl", [{"prompt": "Q?", "target": "A"}, big_record(10_000)])
    out = tmp_path / "run"
    start = time.monotonic()
    result = runner.invoke(app, ["bench", "--dataset", str(data), "--model", str(config_only), "--device", "cpu",
                                 "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "case facts/1: 10000 paraphrases, more than --max-probes 64" in result.output
    assert "--probes cut" in result.output and "--probes sample" in result.output
    assert time.monotonic() - start < 30 and not out.exists()


def test_probes_are_cut_or_sampled_on_request_as_the_error_advises(tmp_path, tokenizer):
    data = str(write_facts(tmp_path / "facts.jsonl", [big_record(10_000)]))
    cut = check_run(RunSpec("ft-m", dataset=data, probes="cut"), tokenizer).cases[0]
    assert cut.rephrases == tuple(big_record(64)["paraphrases"])
    sampled = check_run(RunSpec("ft-m", dataset=data, probes="sample"), tokenizer).cases[0]
    again = check_run(RunSpec("ft-m", dataset=data, probes="sample"), tokenizer).cases[0]
    other_seed = check_run(RunSpec("ft-m", dataset=data, probes="sample", seed=1), tokenizer).cases[0]
    order = {text: i for i, text in enumerate(big_record(10_000)["paraphrases"])}
    assert len(sampled.rephrases) == 64 and sampled == again and sampled != other_seed and sampled != cut
    assert [order[t] for t in sampled.rephrases] == sorted(order[t] for t in sampled.rephrases)
    raised = check_run(RunSpec("ft-m", dataset=data, max_probes=10_000), tokenizer).cases[0]
    assert len(raised.rephrases) == 10_000


def test_the_bound_counts_every_kind_of_a_group_together():
    probes = {kind: tuple(Probe(f"{kind} {i} is", "x") for i in range(40)) for kind in ("near", "far")}
    case = EditCase("c", "P is", "T", locality=probes, portability={"one": probes["near"][:3]})
    with pytest.raises(DatasetError, match="case c: 80 locality probes, more than --max-probes 64"):
        bound_probes([case])
    cut = bound_probes([case], mode="cut")[0]
    assert [len(v) for v in cut.locality.values()] == [40, 24] and cut.portability == case.portability
    assert bound_probes([case], most=80) == [case]


def test_a_limit_beyond_the_dataset_runs_what_exists_and_an_empty_slice_is_an_error(tmp_path, tokenizer, caplog):
    facts = [{"prompt": "Q?", "target": "A"}, {"prompt": "R?", "target": "B"}]
    data = str(write_facts(tmp_path / "facts.jsonl", facts))
    with caplog.at_level(logging.WARNING):
        cases = check_run(RunSpec("ft-m", dataset=data, limit=5), tokenizer).cases
    assert len(cases) == 2
    assert f"--limit 5: dataset {data!r} has 2 cases from --offset 0; running those 2" in caplog.text
    with pytest.raises(SpecError, match=r"has 2 cases, so none from --offset 2"):
        check_run(RunSpec("ft-m", dataset=data, offset=2), tokenizer)
    with pytest.raises(SpecError, match=r"--limit must be >= 1, got 0"):
        RunSpec("ft-m", limit=0)


def test_parallel_beyond_the_memory_model_is_refused_and_the_advised_size_fits(tiny_llama, monkeypatch):
    editor = make_editor("ft-m", tiny_llama, CrossEntropy(), layer=2)
    evaluator = Evaluator(tiny_llama)
    memory = run_module.case_memory(editor, evaluator, tiny_llama)
    monkeypatch.setattr(run_module, "free_memory", lambda device: 3 * memory.total + 1)
    with pytest.raises(SpecError, match=r"--parallel 10000: 20 cases at once need about .* --parallel 3 or less"):
        run_module.check_parallel(editor, evaluator, tiny_llama, 10_000, 20)
    run_module.check_parallel(editor, evaluator, tiny_llama, 3, 20)  # the advice
    run_module.check_parallel(editor, evaluator, tiny_llama, 10_000, 2)  # only two cases to edit at once


def test_the_generated_answers_memory_counts_when_it_exceeds_a_training_step(tiny_llama):
    """A case's memory is its state plus the larger of a training step's activations and what evaluating it
    holds: teacher forcing nothing worth counting, the wild protocol its replies' key/value cache (twice, as the
    7B rehearsal measured), in the context's template when it has one."""
    editor = make_editor("ft-m", tiny_llama, CrossEntropy(), layer=2)
    shape = parallel_editing.ModelShape.of(tiny_llama.model.config, tiny_llama.dtype)
    taught = run_module.case_memory(editor, Evaluator(tiny_llama), tiny_llama)
    assert taught == editor.case_memory()
    bare = WildEvaluator(tiny_llama, WildSettings(context="bare"), inner=Evaluator(tiny_llama))
    tokens = len(tiny_llama.tokenizer("")["input_ids"]) + wild.PROMPT_TOKENS + bare.settings.max_new_tokens
    per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * shape.dtype_bytes  # keys and values
    assert shape.reply_cache(wild.CASE_PROBES, tokens) == 2 * wild.CASE_PROBES * tokens * per_token
    assert bare.case_memory(shape) == shape.reply_cache(wild.CASE_PROBES, tokens)
    qa = WildEvaluator(tiny_llama, WildSettings(context="qa"))
    assert qa.case_memory(shape) > bare.case_memory(shape)
    memory = parallel_editing.CaseMemory(state=10, activations=100, evaluation=300)
    assert memory.total == 310 and parallel_editing.CaseMemory(10, 500, evaluation=300).total == 510


def test_the_float32_head_copy_is_counted_once_per_window_in_bf16(tiny_llama, monkeypatch):
    """The training objectives read a float32 copy of the head (made once, shared by every case): a bf16
    model's memory model holds it apart from the per-case bytes, and --parallel auto and the check of a given
    --parallel set it aside before dividing the free memory by the cases; in float32 there is none."""
    shape = parallel_editing.ModelShape.of(tiny_llama.model.config, torch.bfloat16)
    assert shape.fp32_head == 4 * shape.vocab * shape.hidden
    assert parallel_editing.ModelShape.of(tiny_llama.model.config, torch.float32).fp32_head == 0
    memory = parallel_editing.CaseMemory(state=100, activations=100, shared=1000)
    monkeypatch.setattr(parallel_editing, "free_memory", lambda device: 2 * (1000 + 5 * 200))
    assert parallel_editing.parallel_size(memory, torch.device("cpu")) == 5  # (half of 4000 - 1000) / 200
    editor = make_editor("ft-m", tiny_llama, CrossEntropy(), layer=2)
    monkeypatch.setattr(editor, "case_memory", lambda: memory)
    monkeypatch.setattr(run_module, "free_memory", lambda device: 1000 + 3 * 200)
    run_module.check_parallel(editor, Evaluator(tiny_llama), tiny_llama, 3, 20)
    with pytest.raises(SpecError, match=r"--parallel 4: 4 cases at once need .* MiB once, ft-m.*give --parallel 3 "):
        run_module.check_parallel(editor, Evaluator(tiny_llama), tiny_llama, 4, 20)


def test_a_long_edit_shows_its_updates_and_logs_them(caplog):
    shown, seen = [], []

    class Inner:
        def on_step(self, editor, cases):
            return seen.append

        def edited(self, result):
            seen.append(result)

    progress = run_module.StepProgress(shown.append, Inner(), every_s=0.0)
    step = progress.on_step(None, [EditCase("zsre/7", "P is", "T")])
    info = SimpleNamespace(step=3, cases=[EditCase("zsre/7", "P is", "T")])
    with caplog.at_level(logging.INFO):
        step(info)
    progress.edited("handle")
    assert shown == ["editing zsre/7: 3 updates"] and seen == [info, "handle"]
    assert "zsre/7: still editing, 3 updates in" in caplog.text


# ---------------------------------------------------------------------------------------------- smaller


def test_json_csv_and_json_lines_errors_count_from_1(tmp_path):
    good, bad = {"prompt": "Q?", "target": "A"}, {"prompt": "Q?", "target": ""}
    array = tmp_path / "facts.json"
    array.write_text(json.dumps([good, bad]))
    with pytest.raises(DatasetError, match=rf"{array}: record 2: field 'target': is empty"):
        load_benchmark(str(array))
    table = tmp_path / "facts.csv"
    table.write_text("prompt,target,subject\nQ?,A,\nR?,B,x,y\n")
    with pytest.raises(DatasetError, match=rf"{table}: line 3: more cells than the header has columns"):
        load_benchmark(str(table))
    table.write_text("prompt,target,paraphrases\nQ?,A,\nR?,B,\n")
    assert len(load_benchmark(str(table))) == 2
    table.write_text("prompt,target,paraphras\nQ?,A,\nR?,B,x\n")
    with pytest.raises(DatasetError, match=rf"{table}: record 2: field 'paraphras': unknown field"):
        load_benchmark(str(table))
    lines = tmp_path / "facts.jsonl"
    lines.write_text(json.dumps(good) + "\n{\n")
    with pytest.raises(DatasetError, match=rf"{lines}: line 2: not valid JSON"):
        load_benchmark(str(lines))
    lines.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DatasetError, match=rf"{lines}: record 2: field 'target': is empty"):
        load_benchmark(str(lines))
    array.write_text(json.dumps(["text"]))
    with pytest.raises(DatasetError, match=rf"{array}: record 1: expected a JSON object"):
        load_benchmark(str(array))


def test_edit_interrupted_ends_with_one_line(tiny_llama_dir, monkeypatch):
    def interrupted(self, stack):
        raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(run_module.PreparedRun, "edit_kept", interrupted)
    result = runner.invoke(app, ["edit", "--prompt", "The capital of France is", "--target", "Rome", "--model",
                                 str(tiny_llama_dir), "--device", "cpu", "--layer", "2", "--steps", "1"])
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines()[-1] == ("interrupted by SIGINT: nothing was saved; rerun the same "
                                                      "command to start again")
