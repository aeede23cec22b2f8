"""kill -9 for real, inside an edit stream: ``python -m overtone bench --stream`` killed twice at random moments
after a checkpoint, restarted, ends with the records of an uninterrupted stream, case for case and field for
field (timings aside), and the restarts skip the edits their checkpoint covers.

The stream: 16 ZsRE cases on the tiny Llama, FT-M in batches of 2, a checkpoint after every 2 batches, the
curve every 4 edits. The kills come once the process has written a checkpoint of its own, at a random moment
within the next two batches' time (seeded, so the kill points repeat).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from test_kill import Bench, finish, records, reference

from overtone.artifacts import load_edit
from overtone.runner.store import CASES_FILE, scan_cases
from overtone.runner.stream import STREAM_DIR

pytestmark = pytest.mark.slow


def stream_args(model: Path, out: Path) -> list[str]:
    return ["--model", str(model), "--device", "cpu", "--layer", "2", "--steps", "20", "--stop-loss", "0",
            "--objective", "overtone", "--limit", "16", "--sequence", "16", "--batch", "2", "--stream",
            "--checkpoint-every", "2", "--curve-every", "4", "--curve-sample", "3", "--fluency-tokens", "4",
            "--out", str(out)]


def checkpoints(out: Path) -> list[int]:
    folder = out / STREAM_DIR / "chunk-0"
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("edits-*")) if folder.is_dir() else []


def test_a_stream_killed_twice_resumes_from_its_checkpoints(tmp_path, tiny_llama_dir, caplog):
    rng = random.Random(4)
    expected = reference(stream_args(tiny_llama_dir, tmp_path / "reference"))
    batch_s = 2 * min(r["edit_s"] for r in scan_cases(tmp_path / "reference" / CASES_FILE).records)
    out = tmp_path / "run"
    args = stream_args(tiny_llama_dir, out)
    kills = []
    for _ in range(2):
        before = max(checkpoints(out), default=0)
        run = Bench(args)
        run.wait_for(lambda before=before: max(checkpoints(out), default=0) > before)  # a checkpoint of its own
        time.sleep(rng.uniform(0.0, 2 * batch_s))  # ... and inside the next batches
        run.kill()
        kills.append(max(checkpoints(out)))
        assert not (out / CASES_FILE).exists() or lines_of(out) == 0  # records come at the stream's end only
    assert kills[0] < kills[1] < 16
    finish(args, caplog)
    final = load_edit(out / STREAM_DIR / "chunk-0" / "edits-000016").manifest["protocol"]["stream"]
    assert final["from"] == kills[1]  # the last restart built on the checkpoint the second kill left
    got = records(out)
    assert got == expected and len(got) == 16
    print(f"killed after the checkpoints of {kills[0]} and {kills[1]} edits; 16 records equal")


def lines_of(out: Path) -> int:
    return (out / CASES_FILE).read_bytes().count(b"\n")
