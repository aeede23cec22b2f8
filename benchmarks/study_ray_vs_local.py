"""Wall time of one study on the Ray executor (2 workers, 1 thread each) against the local executor.

The study: FT-M with CE and with OverTone on the first 40 ZsRE test cases, the embedded model, single
editing (80 edits). Each executor runs it end to end as ``overtone study run`` in a fresh output
directory (process start, Ray start-up and model loading included), back to back; the script prints
both wall times, their ratio (Ray / local; the aim is <= 0.6 on two cores) and the load average
before and after, because other work on the machine slows both runs. It also checks that both runs
stored the same results (timings aside).

    python benchmarks/study_ray_vs_local.py            # ray first, then local
    python benchmarks/study_ray_vs_local.py --cases 10 --order local,ray
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SRC = Path(__file__).resolve().parent.parent / "src"


def study(cases: int) -> dict:
    return {
        "name": "speed-ftm",
        "fixed": {"model": "smollm2-135m", "device": "cpu", "dtype": "fp32", "threads": 1, "dataset": "zsre",
                  "offset": 0, "limit": cases, "editor": "ft-m", "seed": 0},
        "axes": {"variant": ["ce", "overtone"]},
    }


def results(out: Path) -> tuple[dict[tuple[str, str], dict], float]:
    """Stored records without timings, by cell directory and case id, and the seconds the workers spent on
    them (edit and evaluation, summed over cases)."""
    found, busy = {}, 0.0
    for path in out.glob("*/cases.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            busy += record["edit_s"] + record["eval_s"]
            found[(path.parent.name, record["case_id"])] = {k: v for k, v in record.items()
                                                            if k not in ("edit_s", "eval_s")}
    return found, busy


def run(executor: str, spec: Path, out: Path, workers: int, shard_size: int) -> float:
    command = [sys.executable, "-m", "overtone", "study", "run", str(spec), "--out", str(out), "--executor", executor,
               "--shard-size", str(shard_size)]
    if executor == "ray":
        command += ["--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{executor} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40, help="ZsRE cases (first N); the study edits each twice")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (1 thread each)")
    parser.add_argument("--shard-size", type=int, default=2, help="cases per unit of work")
    parser.add_argument("--order", default="ray,local", help="which executor runs first")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="study-speed-") as tmp:
        spec = Path(tmp) / "speed.yaml"
        spec.write_text(yaml.safe_dump(study(args.cases)))
        seconds, stored = {}, {}
        for executor in args.order.split(","):
            load = os.getloadavg()[0]
            seconds[executor] = run(executor, spec, Path(tmp) / executor, args.workers, args.shard_size)
            stored[executor], busy = results(Path(tmp) / executor)
            print(f"{executor:>5}: {seconds[executor]:7.1f} s wall for {2 * args.cases} edits "
                  f"(load average {load:.1f} before, {os.getloadavg()[0]:.1f} after); editing and evaluating "
                  f"took {busy:.1f} worker-seconds ({busy / (2 * args.cases):.2f} s per edit)")
        same = stored["ray"] == stored["local"]
        print(f"same results from both executors: {same}")
        print(f"wall-time ratio ray/local: {seconds['ray'] / seconds['local']:.2f} "
              f"(aim <= 0.6; {args.workers} workers on {os.cpu_count()} cores)")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
