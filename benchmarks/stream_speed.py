"""Throughput of an edit stream (``overtone bench --stream``), measured in one run through the runner.

Streams N cases of a dataset in batches of B (``--sequence N --batch B --stream``) into a fresh run directory
and prints, as measured: the wall time from the model's loading to the summary, its parts (the edits, as the
records' ``edit_s`` add up; the unedited pass; the final evaluation of all N edits and, inside it, the fluency
continuations; the curve points; the checkpoints; the rest), edits per second over the whole run, the
process's peak resident memory and, on a GPU, the peak GPU memory, and the time of a 10,000-edit stream
extrapolated from these parts (each part grows linearly with N; loading does not). The stream's lifelong
metrics are printed too, so a throughput is read next to what it bought. The parts are timed by wrapping
the stream's own functions (``lifelong_speed.timed``), nothing is run twice. Before the stream, the rate of
an fp32 matrix product of the embedded model's MLP shape (tokens x 576 by 576 x 1,536) is measured for
a few seconds: what this CPU gives at that moment, for the FLOP bound of docs/performance.md.

    python benchmarks/stream_speed.py --editor memit --limit 1000 --batch 100
    python benchmarks/stream_speed.py --editor ultraedit --limit 10000 --batch 100 --curve-every 1000
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from lifelong_speed import timed

from overtone.editors import EDITORS
from overtone.evaluation.lifelong import LifelongScorer
from overtone.runner import ResultStore, RunSpec, check_run, prepare_run
from overtone.runner import stream as stream_module
from overtone.runner.settings import parse_items

TARGET = 10_000  # edits of the extrapolated stream


def matmul_gflops(seconds: float = 5.0) -> float:
    """GFLOP/s of a 4,096 x 576 by 576 x 1,536 fp32 product, repeated for ``seconds`` (after warming up)."""
    a, b = torch.randn(4096, 576), torch.randn(576, 1536)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * 4096 * 576 * 1536 * count / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--editor", default="memit")
    parser.add_argument("--objective", default="ce")
    parser.add_argument("--dataset", default="counterfact-mend")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--limit", type=int, default=1000, help="N: edits in the stream")
    parser.add_argument("--batch", type=int, default=100, help="B: cases per edit call")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--curve-every", type=int, default=0)
    parser.add_argument("--fluency-tokens", type=int, default=32)
    parser.add_argument("--fluency-every", type=int, default=1, help="K: the fluency of every K-th edit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an editor setting")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    spec = RunSpec(editor=args.editor, objective=args.objective, dataset=args.dataset, model=args.model,
                   device=args.device, threads=args.threads, limit=args.limit, sequence=args.limit,
                   batch=args.batch, stream=True, checkpoint_every=args.checkpoint_every,
                   curve_every=args.curve_every, fluency_tokens=args.fluency_tokens,
                   fluency_every=args.fluency_every,
                   settings=tuple(parse_items(args.set, EDITORS[args.editor].config_class, args.editor).items()))
    out = args.out or Path(tempfile.mkdtemp(prefix="stream-speed-")) / "run"
    gflops = matmul_gflops()
    start = time.perf_counter()
    inputs = check_run(spec)
    prepared = prepare_run(spec, inputs)
    loaded = time.perf_counter()
    evaluated: list[float] = []  # every _evaluated call: the unedited pass, the curve points, the final one
    fluency: list[float] = []
    checkpoints: list[float] = []
    with ResultStore(out, prepared.config) as store, ExitStack() as timers:
        timers.enter_context(timed(stream_module, "_evaluated", evaluated))
        timers.enter_context(timed(LifelongScorer, "continuations", fluency))
        timers.enter_context(timed(stream_module.Checkpoints, "write", checkpoints))
        summary = prepared.execute(store)
        records = store.records
    wall = time.perf_counter() - start
    edit_s = sum(r["edit_s"] for r in records)
    # in call order: the unedited pass, the curve points, the final evaluation (and its fluency), the end's point
    final = len(evaluated) - (2 if args.curve_every else 1)
    unedited_s, final_s, curve_s = evaluated[0], evaluated[final], sum(evaluated[1:]) - evaluated[final]
    final_fluency_s = fluency[final - 1] if fluency else 0.0
    parts = {"edit_s": edit_s, "unedited_s": unedited_s, "final_eval_s": final_s, "curve_s": curve_s,
             "checkpoint_s": sum(checkpoints)}
    parts["other_s"] = wall - (loaded - start) - sum(parts.values())
    scale = TARGET / len(records)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    result = {
        "editor": args.editor, "objective": args.objective, "dataset": args.dataset, "model": args.model,
        "device": str(prepared.lm.device), "threads": args.threads, "edits": len(records), "batch": args.batch,
        "wall_s": round(wall, 1), "load_s": round(loaded - start, 1), **{k: round(v, 1) for k, v in parts.items()},
        "final_fluency_s": round(final_fluency_s, 1), "final_eval_share": round(final_s / (wall - (loaded - start)), 3),
        "edits_per_s": round(len(records) / wall, 3), "matmul_gflops": round(gflops, 1),
        f"extrapolated_{TARGET}_s": round(loaded - start + scale * sum(parts.values()), 0),
        f"extrapolated_{TARGET}_without_fluency_s": round(loaded - start + scale * (sum(parts.values()) -
                                                                                      sum(fluency)), 0),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_gpu_gib": None if peak_gpu is None else round(peak_gpu, 2),
        "metrics": {m: summary.get(m) for m in ("rel", "gen", "loc")}, "lifelong": summary.get("lifelong"),
        "run": str(out),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
