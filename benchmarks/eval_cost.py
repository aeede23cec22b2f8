"""The evaluation's cost per case, teacher-forced, wild and both, before and after the fast decoder and the cache
of the unedited model's evaluation, measured in one run on the embedded model.

Every row is a run of the runner (``RunSpec`` -> ``prepare_run`` -> ``execute``) on the first ``--limit`` ZsRE
test cases with FT-M and the CE objective, at ``--parallel 1`` and ``8``; printed is the mean ``eval_s`` of
its records (the evaluation's seconds per case: the unedited and the edited model's, every protocol the run
asks for). Three states per protocol:

* ``before``: transformers' ``generate`` for the replies (``WildSettings.decoder = "generate"``, swapped on the
  prepared evaluator) and no evaluation cache: the evaluation as it was;
* ``cold``: the fast decoder (``evaluation/decoding.py``) with a fresh, empty cache, which the run fills: the
  first run on a slice;
* ``warm``: the same run again, every unedited result read from that cache: every later run on the slice (the
  other objective of a pair, each ablation row, each seed).

Teacher-forced has no decoder, so its ``before`` is the run without a cache. Then two ratios:

* (a) ``--eval both`` per case over teacher-forced alone at ``--parallel 8``, cold and warm (target <= 2);
* (b) a CE + OverTone pair's evaluation (``--eval both``, ``--parallel 8``), after over before (target <= 0.6):
  before = both runs as ``before``; after = the CE run cold and the OverTone run warm, as a pair runs now.

Every cache is a temporary ``$OVERTONE_EVAL_CACHE``: the user's is neither read nor written. Rows run one after
another; a busy machine moves every row, so compare ratios of one run.

``--decode-steps`` instead times every forward pass of the edited models' replies in one warm ``--eval wild``
run at ``--parallel 8``: the prefill, then each decoding step with the rows still live, grouped by rows: where the
wild evaluation's time goes.

    python benchmarks/eval_cost.py --limit 16 --threads 1
    python benchmarks/eval_cost.py --limit 8 --threads 1 --decode-steps
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import torch

from overtone import load_model
from overtone.evaluation import EvalCache, WildEvaluator
from overtone.models.loading import LoadedModel
from overtone.runner import ResultStore, RunSpec, prepare_run, read_run

PARALLEL = (1, 8)
MODES = ("teacher-forced", "wild", "both")
STATES = ("before", "cold", "warm")


@contextmanager
def fresh_cache() -> Iterator[None]:
    """A new, empty evaluation cache for the runs inside (``$OVERTONE_EVAL_CACHE``), the old setting restored."""
    with tempfile.TemporaryDirectory() as root, mock.patch.dict(os.environ, {"OVERTONE_EVAL_CACHE": root}):
        yield


def eval_seconds(lm: LoadedModel, limit: int, mode: str, parallel: int, decoder: str, cache: bool,
                 objective: str = "ce") -> float:
    """Mean evaluation seconds per case of one run through the runner."""
    spec = RunSpec(editor="ft-m", objective=objective, limit=limit, evaluation=mode, parallel=parallel,
                   eval_cache=cache)
    prepared = prepare_run(spec, lm=lm)
    if isinstance(prepared.evaluator, WildEvaluator):
        prepared.evaluator.settings = dataclasses.replace(prepared.evaluator.settings, decoder=decoder)
    with tempfile.TemporaryDirectory() as scratch:
        with ResultStore(scratch, prepared.config) as store:
            prepared.execute(store)
        records = read_run(scratch)[1]
    return statistics.fmean(r["eval_s"] for r in records)


def measure(lm: LoadedModel, limit: int, mode: str, parallel: int, objective: str = "ce") -> dict[str, float]:
    """Seconds per case of ``mode`` before, cold and warm (the module docstring)."""
    out = {"before": eval_seconds(lm, limit, mode, parallel, "generate", cache=False, objective=objective)}
    with fresh_cache():
        out["cold"] = eval_seconds(lm, limit, mode, parallel, "fast", cache=True, objective=objective)
        out["warm"] = eval_seconds(lm, limit, mode, parallel, "fast", cache=True, objective=objective)
    return out


def decode_steps(lm: LoadedModel, limit: int) -> None:
    """Print the rows and seconds of every forward pass of a warm wild run's replies (its prefill and decode steps)."""
    passes: list[tuple[int, int, float]] = []  # rows, tokens, seconds of each pass that extends a cache
    forward = lm.model.forward

    def timed(*args: object, **kwargs: object) -> object:
        begin = time.perf_counter()
        out = forward(*args, **kwargs)
        ids = kwargs.get("input_ids")
        if kwargs.get("cache") is not None and isinstance(ids, torch.Tensor):
            passes.append((ids.size(0), ids.size(1), time.perf_counter() - begin))
        return out

    with fresh_cache():
        eval_seconds(lm, limit, "wild", 8, "fast", cache=True)  # cold: fills the cache with the unedited replies
        with mock.patch.object(lm.model, "forward", timed):
            per_case = eval_seconds(lm, limit, "wild", 8, "fast", cache=True)
    prefill = [p for p in passes if p[1] > 1]
    steps = [p for p in passes if p[1] == 1]
    print(f"wild, warm, --parallel 8, {limit} cases: {per_case:.3f} s/case of evaluation; forward passes of the "
          f"edited models' replies {sum(p[2] for p in passes):.2f} s")
    print(f"prefill: {len(prefill)} passes, {sum(p[0] * p[1] for p in prefill)} tokens, "
          f"{sum(p[2] for p in prefill):.2f} s")
    print(f"decoding: {len(steps)} steps, {sum(p[0] for p in steps)} row-tokens, {sum(p[2] for p in steps):.2f} s")
    print(f"{'live rows':>12}{'steps':>8}{'s per step':>12}{'s in all':>10}")
    for low, high in ((1, 4), (5, 10), (11, 20), (21, 40), (41, 10**6)):
        group = [p[2] for p in steps if low <= p[0] <= high]
        if group:
            print(f"{f'{low}-{high}' if high < 10**6 else f'{low}+':>12}{len(group):>8}"
                  f"{statistics.fmean(group):12.3f}{sum(group):10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=16, help="the first N ZsRE test cases")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decode-steps", action="store_true", help="only time the wild replies' forward passes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("smollm2-135m", device="cpu")
    EvalCache(lm)  # the model's identity, taken before the runs without a cache edit it (else never trusted)
    if args.decode_steps:
        decode_steps(lm, args.limit)
        return
    start = time.perf_counter()
    print(f"FT-M + CE on the first {args.limit} ZsRE test cases, {args.threads} thread(s): evaluation s/case")
    print(f"{'eval':<16}{'--parallel':>10}" + "".join(f"{state:>10}" for state in STATES) + f"{'warm/before':>13}")
    table: dict[tuple[str, int], dict[str, float]] = {}
    for mode in MODES:
        for parallel in PARALLEL:
            row = table[mode, parallel] = measure(lm, args.limit, mode, parallel)
            print(f"{mode:<16}{parallel:>10}" + "".join(f"{row[s]:10.3f}" for s in STATES)
                  + f"{row['warm'] / row['before']:13.2f}", flush=True)
    both, tf = table["both", 8], table["teacher-forced", 8]
    print(f"(a) --eval both / teacher-forced at --parallel 8: cold {both['cold'] / tf['cold']:.2f}, "
          f"warm {both['warm'] / tf['warm']:.2f} (target <= 2)")
    overtone = eval_seconds(lm, args.limit, "both", 8, "generate", cache=False, objective="overtone")
    before = both["before"] + overtone
    with fresh_cache():
        after = sum(eval_seconds(lm, args.limit, "both", 8, "fast", cache=True, objective=objective)
                    for objective in ("ce", "overtone"))
    print(f"(b) CE + OverTone pair, --eval both, --parallel 8: before {before:.3f} s/case, after (fast decoder, "
          f"CE cold, OverTone warm) {after:.3f} s/case: {after / before:.2f} (target <= 0.6)")
    print(f"benchmark wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
