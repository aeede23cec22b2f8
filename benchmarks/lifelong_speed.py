"""Where the time of a batch edit goes for MEMIT, AlphaEdit and UltraEdit, measured in one run.

On the first N CounterFact edit records and the embedded model (CE, the editors' presets), in this order:

* MEMIT, one batch edit of N facts with ``value_batch`` 1 (the values optimised one fact after the
  other, as before batching) and with ``value_batch`` B: the seconds of the v* optimisations per fact
  and per value update, and their ratio;
* AlphaEdit, the same batch with ``value_batch`` B: v* seconds per fact (the same machinery as MEMIT's)
  and the share of the batch's time spent in its null-space solves (``alphaedit_factors``);
* UltraEdit, one batch of M facts, its pass as one length-blind padded grid (as before length groups)
  and in length groups (``ultraedit.PASS_TOKENS``), alternated twice, the faster of each kept: seconds
  per batch, the share of the forward and backward pass, the share of padding in the length-blind
  grid, and the ratio.

The parts are timed inside the real ``edit`` calls (the timed functions are wrapped, not re-run), each
edit reverted before the next. The second-moment statistics are read from 12 samples of 512 tokens
(the tests' setting, cached): they change what the solves compute, not what they cost.

    python benchmarks/lifelong_speed.py --facts 16 --value-batch 16 --ultra-facts 100 --threads 1
    python benchmarks/lifelong_speed.py --parts ultraedit --ultra-facts 100
    python benchmarks/lifelong_speed.py --parts evaluation --eval-cases 200 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from unittest import mock

import torch

from overtone import load_benchmark, load_model, make_editor
from overtone.editors import alphaedit, memit, ultraedit
from overtone.evaluation import Evaluator
from overtone.evaluation.lifelong import LifelongScorer, evaluate_together
from overtone.objectives import CrossEntropy
from overtone.tokens import encode_pairs

log = logging.getLogger("lifelong_speed")
STATISTICS = {"mom2_samples": 12, "mom2_max_tokens": 512}


@contextmanager
def timed(module: Any, name: str, spent: list[float]) -> Iterator[None]:
    """Within the block, every call of ``module.name`` adds its seconds to ``spent``."""
    inner: Callable[..., Any] = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    with mock.patch.object(module, name, wrapper):
        yield


def batch_edit(lm: Any, name: str, cases: list, settings: dict[str, Any], parts: dict[str, tuple[Any, str]]
               ) -> dict[str, Any]:
    """One ``edit`` of ``cases``, reverted: its seconds, value updates, and the seconds of each timed part."""
    statistics = {} if name == "ultraedit" else STATISTICS
    editor = make_editor(name, lm, CrossEntropy(), **statistics, **settings)
    spent: dict[str, list[float]] = {part: [] for part in parts}
    with ExitStack() as stack:
        for part, (owner, attribute) in parts.items():
            stack.enter_context(timed(owner, attribute, spent[part]))
        start = time.perf_counter()
        handle = editor.edit(cases)
        total = time.perf_counter() - start
    handle.revert()
    result = {"edit_s": round(total, 2), "steps": handle.stats.steps}
    result.update({f"{part}_s": round(sum(times), 2) for part, times in spent.items()})
    log.info("%s %s: %s", name, settings, result)
    return result


def stream_evaluation(lm: Any, cases: list, fluency_tokens: int) -> dict[str, Any]:
    """A stream's evaluation of ``cases`` both ways (module docstring): seconds per side, ratios, same records."""
    evaluator, scorer = Evaluator(lm), LifelongScorer(lm, fluency_tokens)
    group = range(0, len(cases), 64)
    start = time.perf_counter()
    pres = [pre for first in group for pre in evaluator.before_many(cases[first: first + 64], None)]
    apart = {"pre": (pres, scorer.score(cases, fluency_of=False))}
    middle = time.perf_counter()
    results = [r for first in group for r in evaluator.after_many(pres[first: first + 64],
                                                                  [False] * len(pres[first: first + 64]))]
    apart["post"] = (results, scorer.score(cases, fluency_of=False))
    seconds = {"case_by_case_pre_s": middle - start, "case_by_case_post_s": time.perf_counter() - middle}
    start = time.perf_counter()
    together = {"pre": evaluate_together(evaluator, scorer, cases)}
    middle = time.perf_counter()
    together["post"] = evaluate_together(evaluator, scorer, cases, together["pre"][0], fluency_of=False)
    seconds.update({"together_pre_s": middle - start, "together_post_s": time.perf_counter() - middle})
    start = time.perf_counter()
    scorer.continuations([case.prompt for case in cases])
    seconds["fluency_s"] = time.perf_counter() - start

    def comparable(side: str, out: dict[str, Any]) -> Any:
        first, lifelong = out[side]
        if side == "pre":
            return [[t.tolist() for t in pre.predictions.tokens] for pre in first], lifelong
        return [{k: v for k, v in r.items() if k != "eval_s"} for r in first], lifelong

    result: dict[str, Any] = {"cases": len(cases), **{k: round(v, 2) for k, v in seconds.items()}}
    for side in ("pre", "post"):
        result[f"{side}_speedup"] = round(seconds[f"case_by_case_{side}_s"] / seconds[f"together_{side}_s"], 2)
        result[f"{side}_same_records"] = comparable(side, apart) == comparable(side, together)
    log.info("stream evaluation: %s", result)
    return result


def padding_share(lm: Any, cases: list) -> float:
    """The share of padding in the right-padded token grid of ``prompt + target`` over ``cases``."""
    batch = encode_pairs(lm.tokenizer, [c.prompt for c in cases], [c.target for c in cases])
    return 1 - batch.attention_mask.sum().item() / batch.attention_mask.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="counterfact-mend")
    parser.add_argument("--facts", type=int, default=16, help="N: facts of the MEMIT and AlphaEdit batch")
    parser.add_argument("--value-batch", type=int, default=16, help="B: facts per batched v* loop")
    parser.add_argument("--ultra-facts", type=int, default=100, help="M: facts of the UltraEdit batch (0: skip)")
    parser.add_argument("--eval-cases", type=int, default=200, help="E: cases of the stream evaluation (0: skip)")
    parser.add_argument("--fluency-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-sequential", action="store_true", help="skip MEMIT with value_batch 1")
    parser.add_argument("--parts", default="memit,alphaedit,ultraedit,evaluation", help="which parts to time")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    lm = load_model("smollm2-135m")
    cases = load_benchmark(args.dataset, limit=max(args.facts, args.ultra_facts, args.eval_cases))
    facts = cases[: args.facts]
    parts = args.parts.split(",")
    v_part = {"v": (memit, "optimise_values")}
    result: dict[str, Any] = {"dataset": args.dataset, "facts": args.facts, "value_batch": args.value_batch,
                              "threads": args.threads}
    runs = []
    if "memit" in parts:
        if not args.skip_sequential:
            result["memit_sequential"] = batch_edit(lm, "memit", facts, {"value_batch": 1}, v_part)
        result["memit_batched"] = batch_edit(lm, "memit", facts, {"value_batch": args.value_batch}, v_part)
        runs += ["memit_sequential", "memit_batched"]
    if "alphaedit" in parts:
        result["alphaedit_batched"] = batch_edit(lm, "alphaedit", facts, {"value_batch": args.value_batch},
                                                 {**v_part, "solve": (alphaedit, "alphaedit_factors")})
        runs.append("alphaedit_batched")
        alpha = result["alphaedit_batched"]
        result["alphaedit_solve_share"] = round(alpha["solve_s"] / alpha["edit_s"], 4)
    for run in runs:
        if run in result:
            r = result[run]
            r["v_s_per_fact"] = round(r["v_s"] / len(facts), 3)
            r["v_s_per_update"] = round(r["v_s"] / max(r["steps"], 1), 4)
    if "memit_sequential" in result:
        seq, bat = result["memit_sequential"], result["memit_batched"]
        result["v_speedup_per_fact"] = round(seq["v_s_per_fact"] / bat["v_s_per_fact"], 2)
        result["v_speedup_per_update"] = round(seq["v_s_per_update"] / bat["v_s_per_update"], 2)
    if "ultraedit" in parts and args.ultra_facts:
        ultra = cases[: args.ultra_facts]
        # alternated, twice each, the faster kept: the first call of a process also pays for warming up
        for _ in range(2):
            for label, budget in (("ultraedit_one_pass", 10**9), ("ultraedit_grouped", ultraedit.PASS_TOKENS)):
                with mock.patch.object(ultraedit, "PASS_TOKENS", budget):
                    r = batch_edit(lm, "ultraedit", ultra, {}, {"v": (ultraedit.UltraEdit, "features")})
                r["pass_share"] = round(r["v_s"] / r["edit_s"], 3)
                if label not in result or r["edit_s"] < result[label]["edit_s"]:
                    result[label] = r
        result["ultraedit_padding_share"] = round(padding_share(lm, ultra), 3)
        result["ultraedit_speedup"] = round(result["ultraedit_one_pass"]["edit_s"] /
                                            result["ultraedit_grouped"]["edit_s"], 2)
    if "evaluation" in parts and args.eval_cases:
        result["stream_evaluation"] = stream_evaluation(lm, cases[: args.eval_cases], args.fluency_tokens)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
