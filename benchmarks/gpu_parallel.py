"""Parallel single editing on a CUDA device: edits per second (edit + evaluation) at B = 1, 2, 4, .., 64.

With ``--model PATH`` a local checkpoint is edited; without, a randomly initialised model of the
Llama-2-7B shape (benchmarks/rehearsal_7b.py's: Llama-2-7B's sizes and vocabulary, the embedded
tokenizer cut to it) in bfloat16, which costs what the real model costs (the weights' values do not
change the work). For each B the single-editing runner runs ``--cases-per-b`` x B ZsRE cases (at least
8) as ``overtone bench --parallel B --eval EVAL`` does, after a warm-up; printed: seconds per case, edits
per second, the ratio to B = 1, the case's edit and evaluation seconds apart (the evaluation's share),
and the peak memory above the model's own, per case (benchmarks/rehearsal_7b.py's measure). ``--device
cpu --shape tiny`` checks the script in a minute.

ROME runs with u = k* (``mom2_adjustment`` off, the reference toolkit's Llama setting): a random
model has no second-moment statistics worth computing.

    python benchmarks/gpu_parallel.py --editor ft-m --sizes 1,2,4,8,16,32,64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import torch
from rehearsal_7b import peak_above, random_model, synchronize

from overtone import load_benchmark, load_model, make_editor
from overtone.evaluation import make_evaluator
from overtone.objectives import CrossEntropy
from overtone.runner import ResultStore, run_continual


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local checkpoint (default: random 7B-shaped Llama)")
    parser.add_argument("--shape", default="llama-2-7b", help="the random model's shape (tiny: a quick check)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a quick check of the script")
    parser.add_argument("--editor", default="ft-m", choices=["ft-m", "lora", "rome"])
    parser.add_argument("--sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--cases-per-b", type=int, default=2, help="cases timed per B, as a multiple of B")
    parser.add_argument("--eval", default="teacher-forced", help="teacher-forced, wild or both")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    device = torch.device(args.device)
    lm = load_model(args.model, device=args.device, dtype="bf16") if args.model else random_model(args.shape, device)
    settings = {"mom2_adjustment": False} if args.editor == "rome" else {}
    editor = make_editor(args.editor, lm, CrossEntropy(), **settings)
    evaluator = make_evaluator("teacher-forced", lm, eval_mode=args.eval)
    sizes = [int(x) for x in args.sizes.split(",")]
    cases = load_benchmark("zsre", limit=max(8, args.cases_per_b * max(sizes)))
    estimate = editor.case_memory().total / 2**20
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{lm.name}, {args.editor}, {name}; estimated {estimate:.0f} MiB per case (--parallel auto); "
          f"--eval {args.eval}")

    def run(selection, size: int) -> tuple[float, list[dict[str, Any]]]:
        with tempfile.TemporaryDirectory() as scratch:
            synchronize(device)
            start = time.perf_counter()
            with ResultStore(scratch, {}) as store:
                run_continual(editor, evaluator, selection, store, parallel=size)
                records = store.records
            synchronize(device)
            return time.perf_counter() - start, records

    run(cases[:2], 2)  # warm-up: kernels, allocator
    print(f"{'B':>4}{'cases':>7}{'s/case':>9}{'edits/s':>9}{'vs B=1':>8}{'edit s':>9}{'eval s':>9}{'eval share':>11}"
          f"{'peak MiB/case':>15}")
    first = None
    for size in sizes:
        selection = cases[: max(8, args.cases_per_b * size)]
        with peak_above(device) as peak:
            seconds, records = run(selection, size)
        seconds /= len(selection)
        first = first or seconds
        edit = sum(r["edit_s"] for r in records) / len(records)
        evaluation = sum(r["eval_s"] for r in records) / len(records)
        print(f"{size:>4}{len(selection):>7}{seconds:9.3f}{1 / seconds:9.2f}{first / seconds:7.2f}x{edit:9.3f}"
              f"{evaluation:9.3f}{evaluation / (edit + evaluation):10.0%}{peak['peak'] / size / 2**20:15.0f}")


if __name__ == "__main__":
    main()
