"""Ctrl-C and SIGTERM during an edit: weights reverted, nothing partial written, a one-line message, a resumable run.

The in-process tests raise a real signal from inside an edit; the command-line test sends real signals
to ``python -m overtone bench`` subprocesses.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_same_state, state
from typer.testing import CliRunner

from overtone.cli import app
from overtone.editors import FTM, FTMConfig
from overtone.evaluation import Evaluator
from overtone.objectives import CrossEntropy
from overtone.runner import ResultStore, read_run, run_continual
from overtone.runner.signals import Interrupted, raise_on_signals
from overtone.runner.store import CASES_FILE, scan_cases

SRC = Path(__file__).resolve().parent.parent / "src"
CONFIG = {"editor": {"name": "ft-m"}, "objective": {"name": "ce"}, "threads": 1}


@pytest.fixture
def signals_raise():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    raise_on_signals()
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


class SignalledFTM(FTM):
    """FT-M that sends its own process a signal at one step of one case's edit."""

    def __init__(self, *args, at: tuple[str, int], signum: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.signum = at, signum

    def edit(self, cases, on_step=None, steps=None):
        def step(info):
            if (cases[0].case_id, info.step) == self.at:
                signal.raise_signal(self.signum)

        return super().edit(cases, on_step=step, steps=steps)


@pytest.mark.parametrize("signum, sequence", [(signal.SIGINT, 1), (signal.SIGTERM, 2)])
def test_a_signal_inside_an_edit_reverts_the_weights_and_writes_nothing_partial(tmp_path, tiny_llama, zsre_cases,
                                                                               signals_raise, signum, sequence):
    before = state(tiny_llama)
    cases = zsre_cases[:4]
    editor = SignalledFTM(tiny_llama, FTMConfig(layer=2, lr=0.1, steps=4), CrossEntropy(), at=("zsre/3", 2),
                          signum=signum)
    with ResultStore(tmp_path, CONFIG) as store, pytest.raises(Interrupted) as caught:
        run_continual(editor, Evaluator(tiny_llama), cases, store, sequence)
    assert caught.value.exit_code == 128 + signum
    assert_same_state(tiny_llama, before)  # the edit in flight (and the chunk's earlier ones) were reverted
    scan = scan_cases(tmp_path / CASES_FILE)
    # single editing keeps cases 0-2; continual T=2 keeps chunk 0 only: chunk 1 (cases 2, 3) was in flight
    assert [r["case_id"] for r in scan.records] == [c.case_id for c in cases[:3 if sequence == 1 else 2]]
    assert not scan.partial_tail and not scan.corrupt
    resumed = FTM(tiny_llama, FTMConfig(layer=2, lr=0.1, steps=4), CrossEntropy())
    with ResultStore(tmp_path, CONFIG) as store:
        summary = run_continual(resumed, Evaluator(tiny_llama), cases, store, sequence)
    assert summary["n_cases"] == 4 and [r["case_id"] for r in read_run(tmp_path)[1]] == [c.case_id for c in cases]


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signalled_bench_process_ends_with_one_line_and_the_same_command_resumes(tmp_path, tiny_llama_dir, signum):
    # SIGINT (Ctrl-C) runs in the slow suite: another Python start-up, and Python raises KeyboardInterrupt for it
    # even without our handler; SIGTERM would kill the process outright without it.
    # 400 steps an edit, so the signal lands inside the second edit: at 40, an idle CPU finished all four cases
    # within the wait below and the signal met the exiting process.
    rng = random.Random(signum)
    out = tmp_path / "run"
    args = ["bench", "--model", str(tiny_llama_dir), "--device", "cpu", "--layer", "2", "--steps", "400",
            "--stop-loss", "0", "--objective", "ce", "--limit", "4", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "overtone", *args], env={**os.environ, "PYTHONPATH": str(SRC)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while _lines(out / CASES_FILE) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # until a case is finished
    time.sleep(rng.uniform(0.05, 0.2))  # then into the next edit
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, output
    assert "Traceback" not in output
    message = [x for x in output.splitlines() if x.startswith("interrupted")]
    scan = scan_cases(out / CASES_FILE)
    assert not scan.partial_tail and not scan.corrupt and 1 <= len(scan.records) < 4
    assert message == [f"interrupted by {signal.Signals(signum).name}: {len(scan.records)} finished cases are saved "
                       f"in {out}; rerun the same command to resume"]
    result = CliRunner().invoke(app, args)  # the same command resumes
    assert result.exit_code == 0, result.output
    assert [r["case_id"] for r in read_run(out)[1]] == [f"zsre/{i}" for i in range(4)]
