"""kill -9 for real: ``python -m overtone bench`` killed at random points and restarted ends with exactly the cases
of an uninterrupted run.

Three scenarios on the tiny Llama (seeded, so the kill points repeat):

* single editing (FT-M): killed twice at random moments inside an edit;
* continual editing (T = 2): killed in the middle of writing a chunk's two records (a partial write,
  injected below ``os.write``: the process writes part of the bytes, then SIGKILLs itself), then at a
  random moment inside a chunk;
* ROME: killed during its second-moment statistics (a 300 KB Wikipedia sample, computed afresh).

Each ends with a restart that finishes the run; its ``cases.jsonl`` must equal, case for case and field
for field (timings aside), that of an uninterrupted run of the same command. In all: 5 kills, 5
restarts, 15 cases compared.

A last test starts a run on a directory this process holds: it is refused at once, naming this process.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import RUN_VARYING
from typer.testing import CliRunner

from overtone.cli import app
from overtone.corpus import load_corpus
from overtone.runner.store import CASES_FILE, RunLock, scan_cases

pytestmark = pytest.mark.slow

SRC = Path(__file__).resolve().parent.parent / "src"
TIMINGS = RUN_VARYING

# Loaded by a killed process through PYTHONPATH: its ``n``-th write to cases.jsonl stops after a fraction
# of the bytes and the process SIGKILLs itself, as a kill inside the write system call would leave it.
PARTIAL_WRITE = """
import os, signal
_write, _seen = os.write, [0]
_nth, _fraction = int(os.environ["KILL_AT_WRITE"]), float(os.environ["KILL_FRACTION"])

def write(fd, data):
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        name = ""
    if name.endswith("cases.jsonl"):
        _seen[0] += 1
        if _seen[0] == _nth:
            _write(fd, bytes(data)[: int(len(data) * _fraction)])
            os.kill(os.getpid(), signal.SIGKILL)
    return _write(fd, data)

os.write = write
"""


def records(out: Path) -> dict[str, dict]:
    scan = scan_cases(out / CASES_FILE)
    assert not scan.corrupt and not scan.partial_tail and not scan.duplicates and not scan.conflicts
    return {r["case_id"]: {k: v for k, v in r.items() if k not in TIMINGS} for r in scan.records}


def lines(out: Path) -> int:
    path = out / CASES_FILE
    return path.read_bytes().count(b"\n") if path.exists() else 0


class Bench:
    """A ``python -m overtone bench`` subprocess whose output is read as it comes."""

    def __init__(self, args: list[str], **env: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "1000", **env}  # COLUMNS: log lines unwrapped
        self.proc = subprocess.Popen([sys.executable, "-m", "overtone", "bench", *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for text in self.proc.stdout:
            self.lines.put(text)

    def wait_for(self, condition, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the run ended early: {''.join(self.drain())}"
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.01)

    def saw(self, text: str) -> bool:
        self.drain()
        return any(text in x for x in self.output)

    def drain(self) -> list[str]:
        while not self.lines.empty():
            self.output.append(self.lines.get())
        return self.output

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=60) == -signal.SIGKILL


def finish(args: list[str], caplog) -> None:
    """The last restart, in this process: it finishes the run (and takes over the killed run's lock)."""
    with caplog.at_level(logging.WARNING, logger="overtone"):
        result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 0, result.output
    assert "taking over the lock of a run that ended without releasing it" in caplog.text


def reference(args: list[str]) -> dict[str, dict]:
    out = Path(args[args.index("--out") + 1])
    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 0, result.output
    return records(out)


def ftm_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--device", "cpu", "--layer", "2", "--steps", "30", "--stop-loss", "0",
            "--objective", "overtone", "--limit", "6", "--out", str(out), *extra]


def test_single_editing_killed_twice_mid_edit(tmp_path, tiny_llama_dir, caplog):
    rng = random.Random(1)
    expected = reference(ftm_args(tiny_llama_dir, tmp_path / "reference"))
    case_s = min(r["edit_s"] for r in scan_cases(tmp_path / "reference" / CASES_FILE).records)
    args = ftm_args(tiny_llama_dir, tmp_path / "run")
    out = tmp_path / "run"
    for _ in range(2):
        before = lines(out)
        run = Bench(args)
        run.wait_for(lambda before=before: lines(out) > before)  # this process finished a case of its own ...
        time.sleep(rng.uniform(0.0, 0.8 * case_s))  # ... and is inside the next edit
        run.kill()
        assert lines(out) < 6
    finish(args, caplog)
    assert records(out) == expected and len(expected) == 6


def test_continual_editing_killed_mid_write_and_mid_chunk(tmp_path, tiny_llama_dir, caplog):
    rng = random.Random(2)
    expected = reference(ftm_args(tiny_llama_dir, tmp_path / "reference", "--sequence", "2"))
    chunk_s = 2 * min(r["edit_s"] for r in scan_cases(tmp_path / "reference" / CASES_FILE).records)
    out = tmp_path / "run"
    args = ftm_args(tiny_llama_dir, out, "--sequence", "2")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(PARTIAL_WRITE)
    run = Bench(args, PYTHONPATH=f"{site}{os.pathsep}{SRC}", KILL_AT_WRITE="2",
                KILL_FRACTION=f"{rng.uniform(0.3, 0.9):.3f}")
    assert run.proc.wait(timeout=180) == -signal.SIGKILL  # killed inside the write of chunk 1
    left = (out / CASES_FILE).read_bytes()
    assert left.count(b"\n") >= 2 and not left.endswith(b"\n")  # chunk 0 whole, chunk 1 cut short
    run = Bench(args)
    run.wait_for(lambda: lines(out) >= 4)  # chunk 1 redone and written ...
    time.sleep(rng.uniform(0.0, 0.4 * chunk_s))  # ... and chunk 2 in flight (well before its end)
    run.kill()
    assert lines(out) < 6
    finish(args, caplog)
    assert records(out) == expected and len(expected) == 6


def test_rome_killed_during_its_statistics(tmp_path, tiny_llama_dir, monkeypatch, caplog):
    rng = random.Random(3)
    wiki = load_corpus("wikipedia").path.read_text(encoding="utf-8")[:300_000]
    corpus = tmp_path / "wiki300k.txt"
    corpus.write_text(wiki[: wiki.rfind("</doc>") + len("</doc>")], encoding="utf-8")

    def args(out: Path) -> list[str]:
        return ["--model", str(tiny_llama_dir), "--device", "cpu", "--editor", "rome", "--objective", "ce",
                "--layer", "1", "--steps", "10", "--set", f"mom2_corpus={corpus}", "--set", "mom2_max_tokens=64",
                "--limit", "3", "--out", str(out)]

    monkeypatch.setenv("OVERTONE_CACHE", str(tmp_path / "reference-cache"))
    expected = reference(args(tmp_path / "reference"))
    cache = tmp_path / "cache"
    run = Bench(args(tmp_path / "run"), OVERTONE_CACHE=str(cache))
    run.wait_for(lambda: run.saw("are not cached"))
    time.sleep(rng.uniform(0.0, 0.5))
    run.kill()
    assert not list(cache.rglob("L1-*.safetensors")), "the kill came after the statistics"
    monkeypatch.setenv("OVERTONE_CACHE", str(cache))
    finish(args(tmp_path / "run"), caplog)
    assert records(tmp_path / "run") == expected and len(expected) == 3


def test_a_second_process_on_the_same_directory_is_refused_at_once(tmp_path, tiny_llama_dir):
    out = tmp_path / "run"
    with RunLock(out):  # this process writes the directory
        start = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "overtone", "bench", *ftm_args(tiny_llama_dir, out)],
                                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)
        seconds = time.monotonic() - start
    assert second.returncode == 2, second.stdout + second.stderr
    message = second.stdout.strip()
    assert message.count("\n") == 0 and f"is being written by another run (pid {os.getpid()} on host" in message
    assert "Loading weights" not in second.stdout + second.stderr  # refused before loading the model
    print(f"refused after {seconds:.1f} s, Python's start included")
