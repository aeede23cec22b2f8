"""Nothing lost, nothing twice: studies killed with SIGKILL at random points and restarted, locally and on Ray.

On Ray the restart also shows that it stopped every process of the killed instance (the dashboard and
runtime-env agents included), that a private local instance listens on 127.0.0.1 only and runs with
token authentication (its token in the instance's private folder), and that ``ray.shutdown()`` leaves no
process, session directory or token file behind.

Each test runs the same small study (tiny Llama; FT-M CE/OverTone, LoRA CE, single editing and
continual T = 3) once without interruption, in this process, as the reference. Then it runs it as
``overtone study run`` subprocesses that it kills with SIGKILL at random points (the driver, and on
Ray also one worker process), and a last time to the end. Checked: every record stored before a
kill is still there, unchanged, at the end (no finished case lost or recomputed); every case is
stored exactly once; and the final records equal the reference (timings aside), so a rerun shard
gives the same results wherever it ran.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import RUN_VARYING

from overtone.study import load_study
from overtone.study.driver import DONE, run_study
from overtone.study.executors import ExecutorOptions, LocalExecutor

SRC = Path(__file__).resolve().parent.parent / "src"
TIMINGS = RUN_VARYING
HAS_RAY = importlib.util.find_spec("ray") is not None


def kill_spec(model: Path) -> dict:
    return {
        "name": "kill",
        "fixed": {"model": str(model), "device": "cpu", "dataset": "zsre", "limit": 6, "seed": 0},
        "axes": {"editor": ["ft-m", "lora"], "variant": ["ce", "overtone"], "sequence": [1, 3]},
        "editors": {"ft-m": {"settings": {"steps": 8, "lr": 0.05}}, "lora": {"settings": {"steps": 4}}},
    }


@pytest.fixture(scope="module")
def study_file(tiny_llama_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kill") / "kill.yaml"
    path.write_text(yaml.safe_dump(kill_spec(tiny_llama_dir)))
    return path


@pytest.fixture(scope="module")
def reference(study_file, tmp_path_factory) -> dict[str, dict[str, dict]]:
    """The study run once without interruption, in this process: records by cell directory and case id."""
    out = tmp_path_factory.mktemp("reference")
    scheduler = run_study(load_study(study_file), out, LocalExecutor(ExecutorOptions()))
    assert {s.status for s in scheduler.cells.values()} == {DONE}
    return stored(out)


def stored(out: Path) -> dict[str, dict[str, dict]]:
    """Complete lines of every cell's cases.jsonl, by cell directory and case id; fails on a case stored twice."""
    cells = {}
    for cases in out.glob("*/cases.jsonl"):
        records: dict[str, dict] = {}
        for line in cases.read_text().split("\n")[:-1]:  # the last piece is "" or a line cut by a kill
            record = json.loads(line)
            assert record["case_id"] not in records, f"{cases}: case {record['case_id']} stored twice"
            records[record["case_id"]] = record
        cells[cases.parent.name] = records
    return cells


def count(cells: dict[str, dict[str, dict]]) -> int:
    return sum(len(r) for r in cells.values())


def without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMINGS}


def start(study_file: Path, out: Path, log: Path, *options: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "400"}
    return subprocess.Popen([sys.executable, "-m", "overtone", "study", "run", str(study_file), "--out", str(out),
                             "--shard-size", "2", *options], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def wait_for(condition, process: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the study ended (code {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def kill_at_random_point(process: subprocess.Popen, out: Path, rng: random.Random, total: int,
                         timeout: float = 180, before_kill: Callable[[], None] | None = None) -> None:
    """SIGKILL the driver once the study holds a random number of records: more than now, and at most half of
    what is left (so some work is always left for the next run), plus a few random milliseconds."""
    before = count(stored(out)) if out.exists() else 0
    target = rng.randint(before + 1, before + max(1, (total - before) // 2))
    wait_for(lambda: out.exists() and count(stored(out)) >= target, process, timeout, f"{target} records")
    time.sleep(rng.uniform(0.0, 0.05))
    if before_kill:
        before_kill()
    process.kill()
    process.wait()


def check_against(reference: dict, out: Path, kept: dict[str, dict[str, dict]]) -> None:
    final = stored(out)
    assert {cell: set(records) for cell, records in final.items()} == {
        cell: set(records) for cell, records in reference.items()}
    for cell, records in final.items():
        for case_id, record in records.items():
            assert without_timings(record) == without_timings(reference[cell][case_id]), (cell, case_id)
    lost = [(cell, case_id) for cell, records in kept.items() for case_id, record in records.items()
            if final[cell].get(case_id) != record]
    assert not lost, f"records stored before a kill were lost or rewritten: {lost[:5]}"


def test_local_driver_killed_three_times_loses_and_repeats_nothing(study_file, reference, tmp_path):
    rng = random.Random(15)
    out = tmp_path / "out"
    kept: dict[str, dict[str, dict]] = {}
    at = []
    for kill in range(3):
        process = start(study_file, out, tmp_path / f"run{kill}.log")
        kill_at_random_point(process, out, rng, count(reference))
        kept = stored(out)  # what a kill may not take away
        at.append(count(kept))
    assert 0 < count(kept) < count(reference)
    print(f"driver killed with {at} of {count(reference)} records stored")
    process = start(study_file, out, tmp_path / "last.log")
    assert process.wait(timeout=300) == 0, (tmp_path / "last.log").read_text()
    check_against(reference, out, kept)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def ray_workers(pid: int) -> list[psutil.Process]:
    """The Ray actor processes (``ray::Worker``) started under a driver."""
    found = []
    for p in descendants(pid):
        try:
            if p.cmdline() and p.cmdline()[0].startswith("ray::Worker"):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def ray_temp_dirs(pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"overtone-ray-{pid}-*"))


@pytest.mark.ray
@pytest.mark.skipif(not HAS_RAY, reason="needs the [ray] extra")
def test_ray_worker_and_driver_killed_lose_and_repeat_nothing(study_file, reference, tmp_path):
    rng = random.Random(16)
    out = tmp_path / "out"
    token = Path.home() / ".ray" / "auth_token"
    had_token = token.exists()
    first = start(study_file, out, tmp_path / "run0.log", "--executor", "ray", "--workers", "2")
    wait_for(lambda: out.exists() and count(stored(out)) > 0, first, 240, "the first record")
    workers = ray_workers(first.pid)
    assert len(workers) == 2
    time.sleep(rng.uniform(0.0, 0.5))
    rng.choice(workers).send_signal(signal.SIGKILL)
    log = tmp_path / "run0.log"
    # the driver queues the shard again, or (a kill just after the shard's last delivery) has nothing to rerun
    wait_for(lambda: "its worker died" in log.read_text(), first, 120, "the driver to notice the lost worker")
    orphans: list[psutil.Process] = []  # every process of the first run's instance, agents included
    kill_at_random_point(first, out, rng, count(reference), before_kill=lambda: orphans.extend(descendants(first.pid)))
    assert any("Agent" in command(p) for p in orphans if alive(p)), [command(p) for p in orphans]
    kept = stored(out)
    assert 0 < count(kept) < count(reference)
    requeued = "queued again" in log.read_text()
    print(f"worker killed, its shard {'queued again' if requeued else 'already delivered'}; driver killed with "
          f"{count(kept)} of {count(reference)} records stored")
    last = start(study_file, out, tmp_path / "run1.log", "--executor", "ray", "--workers", "2")
    wait_for(lambda: len(ray_workers(last.pid)) == 2, last, 240, "the workers of the restart")
    # the restart stopped every process of the killed instance, its dashboard and runtime-env agents included
    # (left alone they live on for about a minute, one listening on loopback)
    left = [(p.pid, command(p)) for p in orphans if alive(p)]
    assert not left, f"processes of the killed instance still running: {left}"
    # the workers run at the driver's priority (Ray's default would lower it by 15)
    assert [w.nice() for w in ray_workers(last.pid)] == [psutil.Process(last.pid).nice()] * 2
    processes = descendants(last.pid)  # Ray's own processes and the workers, while the run goes on
    # the private instance runs with token authentication, the token in its private folder (not ~/.ray)
    modes = {environ(p).get("RAY_AUTH_MODE") for p in processes} - {None}
    assert modes == {"token"}, modes
    token_paths = {environ(p).get("RAY_AUTH_TOKEN_PATH") for p in processes} - {None}
    assert len(token_paths) == 1 and Path(token_paths.pop()).parent.name.startswith(f"overtone-ray-{last.pid}-")
    listening = {c.laddr.ip for p in processes for c in connections(p) if c.status == "LISTEN"}
    assert last.wait(timeout=300) == 0, (tmp_path / "run1.log").read_text()
    check_against(reference, out, kept)
    # a private local instance listens on loopback only
    assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
    # ray.shutdown() left no process; the session files of both runs are gone (the killed run's removed by
    # the restart); no auth token file was written
    left = [p.pid for p in processes if alive(p)]
    assert not left, left
    assert not ray_temp_dirs(last.pid) and not ray_temp_dirs(first.pid)
    assert token.exists() == had_token, "Ray wrote an auth token file"


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def command(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())[:80]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def environ(process: psutil.Process) -> dict[str, str]:
    try:
        return process.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return {}


def connections(process: psutil.Process) -> list:
    try:
        return process.net_connections(kind="inet")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
