"""The evaluation's cost per case, teacher-forced, wild and both, with transformers' ``generate`` and with the
fast decoder, measured in one run on the embedded model.

Every row is a run of the runner (``RunSpec`` -> ``prepare_run`` -> ``execute``) on the first ``--limit`` ZsRE
test cases with FT-M and the CE objective, at ``--parallel 1`` and ``8``; printed is the mean ``eval_s`` of
its records (the evaluation's seconds per case: the unedited and the edited model's, every protocol the run
asks for). The wild decoder is swapped on the prepared evaluator (``WildSettings.decoder``): ``generate``
is the path before this decoder, ``fast`` the decoder of ``evaluation/decoding.py``. Then the ratios the
issue targets:

* (a) ``--eval both`` per case / teacher-forced alone, at ``--parallel 8``, fast decoder (target <= 2);
* (b) a CE + OverTone pair's total evaluation time (``--eval both``, ``--parallel 8``) after / today
  (target <= 0.6): today = ``generate`` without a cache of the unedited model's evaluation; after = the
  fast decoder, with that cache (a fresh one under a temporary ``$OVERTONE_CACHE``, filled by the CE run
  and read by the OverTone run) where ``RunSpec`` has ``eval_cache``, else without (printed).

Rows run one after another; a busy machine moves every row, so compare ratios of one run.

    python benchmarks/eval_cost.py --limit 16 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import torch

from overtone import load_model
from overtone.evaluation import WildEvaluator
from overtone.runner import ResultStore, RunSpec, prepare_run, read_run

PARALLEL = (1, 8)
MODES = ("teacher-forced", "wild", "both")
HAS_CACHE = "eval_cache" in {f.name for f in dataclasses.fields(RunSpec)}


def eval_seconds(lm, limit: int, mode: str, parallel: int, decoder: str, objective: str = "ce",
                 cache: bool = False) -> float:
    """Mean evaluation seconds per case of one run through the runner."""
    extra = {"eval_cache": cache} if HAS_CACHE else {}
    spec = RunSpec(editor="ft-m", objective=objective, limit=limit, evaluation=mode, parallel=parallel, **extra)
    prepared = prepare_run(spec, lm=lm)
    if isinstance(prepared.evaluator, WildEvaluator):
        prepared.evaluator.settings = dataclasses.replace(prepared.evaluator.settings, decoder=decoder)
    with tempfile.TemporaryDirectory() as scratch:
        with ResultStore(scratch, prepared.config) as store:
            prepared.execute(store)
        records = read_run(scratch)[1]
    return statistics.fmean(r["eval_s"] for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=16, help="the first N ZsRE test cases")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("smollm2-135m", device="cpu")
    start = time.perf_counter()
    print(f"FT-M + CE on the first {args.limit} ZsRE test cases, {args.threads} thread(s): evaluation s/case")
    print(f"{'eval':<16}{'decoder':<10}" + "".join(f"{f'--parallel {p}':>14}" for p in PARALLEL))
    table: dict[tuple[str, str, int], float] = {}
    for mode in MODES:
        for decoder in ("generate", "fast") if mode != "teacher-forced" else ("-",):
            for parallel in PARALLEL:
                table[mode, decoder, parallel] = eval_seconds(lm, args.limit, mode, parallel, decoder)
            print(f"{mode:<16}{decoder:<10}" + "".join(f"{table[mode, decoder, p]:14.3f}" for p in PARALLEL),
                  flush=True)
    for p in PARALLEL:
        tf = table["teacher-forced", "-", p]
        print(f"--parallel {p}: wild generate -> fast {table['wild', 'generate', p] / table['wild', 'fast', p]:.2f}x "
              f"faster; both / teacher-forced: generate {table['both', 'generate', p] / tf:.2f}, "
              f"fast {table['both', 'fast', p] / tf:.2f}")
    print(f"(a) --eval both / teacher-forced at --parallel 8, fast decoder: "
          f"{table['both', 'fast', 8] / table['teacher-forced', '-', 8]:.2f} (target <= 2)")
    today = table["both", "generate", 8] + eval_seconds(lm, args.limit, "both", 8, "generate", "overtone")
    if HAS_CACHE:
        with tempfile.TemporaryDirectory() as cache_dir:
            saved = os.environ.get("OVERTONE_CACHE")
            os.environ["OVERTONE_CACHE"] = cache_dir  # a fresh cache, filled by the pair's CE run
            try:
                after = sum(eval_seconds(lm, args.limit, "both", 8, "fast", objective, cache=True)
                            for objective in ("ce", "overtone"))
            finally:
                if saved is None:
                    del os.environ["OVERTONE_CACHE"]
                else:
                    os.environ["OVERTONE_CACHE"] = saved
    else:
        after = table["both", "fast", 8] + eval_seconds(lm, args.limit, "both", 8, "fast", "overtone")
    label = "fast decoder + cache of the unedited model's evaluation" if HAS_CACHE else \
        "fast decoder, no cache (RunSpec has no eval_cache in this tree)"
    print(f"(b) CE + OverTone pair, --eval both, --parallel 8: today (generate, no cache) {today:.3f} s/case, "
          f"after ({label}) {after:.3f} s/case: {after / today:.2f} (target <= 0.6)")
    print(f"benchmark wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
