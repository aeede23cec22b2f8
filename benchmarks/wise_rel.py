"""Why WISE + OverTone loses Rel.: a too-small SGD step, or where OverTone's clip stops the edit?

WISE trains its side memory with plain SGD, so each step is lr times the gradient, and OverTone's
gradient is smaller than cross-entropy's (λ(p − onehot) + (1 − λ)(p − π_flt) on a mixed token, zero
on a clipped one). If that were all, a larger lr or more steps would give Rel. back. But a token is
clipped once KL(π_tar ‖ p) < ε, and with λ = 0.1 the mixture asks little of the label: the label
need only be the mode of λ·onehot + (1 − λ)·π_flt, which it can be while another token keeps more
probability. Such a token is clipped with the wrong argmax, and no lr moves it further.

For each case and variant this script edits with WISE on the ZsRE development slice and records,
per step, the mean norm of the objective's gradient at the target logits (``OverTone.gradient_terms``,
clipped tokens as zero), the share of unclipped tokens, the share of target tokens whose label is
the argmax and the margin loss; after the edit, the Rel. metrics, the side memory's change ‖W' − W‖
and, for every target token whose label is not the argmax of the edited model (a Rel. miss), whether
the objective clips it and uses the mixture there: misses that are clipped cannot be fixed by lr.

What it found (docs/wise-melo.md, "Why WISE + OverTone loses Rel."): no missed token is clipped, ε 0.001
does not help, and lr 8 gives Rel. back. The misses are mixed tokens whose label trails a rival that the
mixture raises too, so the push that separates them is about λ times CE's.

    nice -n 10 python benchmarks/wise_rel.py --offset 1000 --limit 10 --threads 1 --out /tmp/wise-rel.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from overtone import Evaluator, load_benchmark, load_model, make_editor
from overtone.editors import StepInfo
from overtone.objectives import IGNORE_INDEX, CrossEntropy, OverTone, OverToneConfig
from overtone.report.stats import paired_difference
from overtone.report.tables import markdown_grid
from overtone.runner.bench import summarize

log = logging.getLogger("wise_rel")
BASE = OverToneConfig(lam=0.1, n_sigma=1.0, epsilon=0.01)  # WISE's overtone_defaults
CE_TERMS = OverTone(OverToneConfig(lam=1.0, epsilon=0.0))  # CE's gradient as OverTone's label term (Prop. 3.1)
SHRINK = {"threshold_scale": 0.6}  # the paper's threshold with OverTone


@dataclass(frozen=True)
class Variant:
    label: str
    overtone: OverToneConfig | None  # None: cross-entropy
    settings: dict[str, Any] = field(default_factory=dict)

    def objective(self) -> CrossEntropy | OverTone:
        return CrossEntropy() if self.overtone is None else OverTone(self.overtone)


def variants() -> list[Variant]:
    return [
        Variant("CE ×0.6", None, SHRINK),
        Variant("OverTone ×0.6", BASE, SHRINK),
        Variant("OverTone ×0.6, lr 4", BASE, {**SHRINK, "lr": 4.0}),
        Variant("OverTone ×0.6, lr 8", BASE, {**SHRINK, "lr": 8.0}),
        Variant("OverTone ×0.6, 70 steps", BASE, {**SHRINK, "steps": 70}),
        Variant("OverTone ×0.6, ε 0.001", replace(BASE, epsilon=0.001), SHRINK),
        Variant("OverTone ×0.6, λ 0.5", replace(BASE, lam=0.5), SHRINK),
        Variant("CE ×1", None),
        Variant("OverTone ×1", BASE),
        Variant("CE ×0.6, lr 8", None, {**SHRINK, "lr": 8.0}),  # does CE gain from lr 8 as well?
    ]


class StepRecorder:
    """``on_step``: per step the objective's mean logit-gradient norm, unclipped and argmax shares, margin."""

    def __init__(self, objective: OverTone) -> None:
        self.objective = objective
        self.rows: list[list[float]] = []

    def __call__(self, info: StepInfo) -> None:
        mask = info.labels.ne(IGNORE_INDEX)
        z, y = info.logits[mask].float(), info.labels[mask]
        label, filt = self.objective.gradient_terms(z, y)
        self.rows.append([(label + filt).norm(dim=-1).mean().item(), info.output.active_tokens / int(mask.sum()),
                          z.argmax(-1).eq(y).float().mean().item(), info.extra_loss or 0.0])


def rel_tokens(evaluator: Evaluator, probes: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [n, V] and labels [n] at the edit prompt's target tokens, as the evaluator scores them."""
    out = evaluator.answer_logits(probes)
    labels = probes.batch.labels[probes.batch.label_mask].split(out.counts)
    rows = [i for i, (metric, _) in enumerate(probes.groups) if metric == "rel"]
    logits = out.rows()
    return torch.cat([logits[i] for i in rows]).float(), torch.cat([labels[i] for i in rows])


def run_case(lm: Any, evaluator: Evaluator, case: Any, rows: Sequence[Variant]) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    for v in rows:
        editor = make_editor("wise", lm, v.objective(), **v.settings)
        pre = evaluator.before(case, record_from=editor.first_layer)
        scorer = OverTone(v.overtone) if v.overtone is not None else CE_TERMS
        recorder = StepRecorder(scorer)
        start = time.perf_counter()
        handle = editor.edit([case], on_step=recorder)
        try:
            cache = pre.predictions.cache
            result = evaluator.after(pre, replay=cache is not None and handle.first_layer >= cache.start)
            z, y = rel_tokens(evaluator, pre.probes)
            shard = editor.state.shards[-1].weight
            moved = (shard - editor.module.weight.detach().float()).norm().item()
        finally:
            handle.revert()
        out = scorer(z[None], y[None])
        p = torch.softmax(z, -1)
        miss = z.argmax(-1).ne(y)
        rival = p.scatter(-1, y[:, None], 0.0).amax(-1)
        records[v.label] = {
            "case_id": case.case_id, "pre": result["pre"], "post": result["post"], "eval_s": result["eval_s"],
            "steps": handle.stats.steps, "edit_s": time.perf_counter() - start, "moved": moved,
            "tokens": int(y.numel()), "misses": int(miss.sum()),
            "miss_clipped": int((miss & out.clipped[0]).sum()), "miss_mixed": int((miss & out.mixed[0]).sum()),
            "miss_p_label": p.gather(-1, y[:, None]).squeeze(-1)[miss].tolist(), "miss_p_rival": rival[miss].tolist(),
            "per_step": recorder.rows,
        }
    return records


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def print_tables(results: dict[str, list[dict[str, Any]]], steps_at: Sequence[int]) -> None:
    n = len(results["CE ×0.6"])
    print(f"\nMetrics ({n} cases; Δ paired with CE at the same threshold, 95% t-interval, * beyond noise)\n")
    table = []
    for label, recs in results.items():
        s = summarize(recs)
        base = "CE ×1" if label.endswith("×1") else "CE ×0.6"
        diffs = []
        for metric in ("rel", "avg"):
            d = paired_difference(results[base], recs, metric) if label != base and base in results else None
            diffs.append("" if d is None else d.marked)
        misses = sum(r["misses"] for r in recs)
        tokens = sum(r["tokens"] for r in recs)
        clipped = sum(r["miss_clipped"] for r in recs)
        mixed = sum(r["miss_mixed"] for r in recs)
        p_label = [x for r in recs for x in r["miss_p_label"]]
        p_rival = [x for r in recs for x in r["miss_p_rival"]]
        table.append([label, *(f"{s[m]:.2f}" for m in ("rel", "gen", "por", "loc", "avg")), *diffs,
                      f"{mean([r['steps'] for r in recs]):.1f}", f"{mean([r['moved'] for r in recs]):.2f}",
                      f"{misses}/{tokens}", f"{clipped} / {mixed}",
                      f"{mean(p_label):.2f} vs {mean(p_rival):.2f}" if p_label else "–"])
    print(markdown_grid(["run", "Rel.", "Gen.", "Por.", "Loc.", "Avg.", "ΔRel.", "ΔAvg.", "steps", "‖W'−W‖",
                         "missed tokens", "of them clipped / mixed", "p(label) vs p(rival) on misses"], table))
    print("\nPer step: mean norm of the objective's gradient at the target logits [unclipped share, share of "
          "target tokens whose label is the argmax, margin loss]\n")
    grid = []
    for label, recs in results.items():
        cells = []
        for step in steps_at:
            at = [r["per_step"][step] for r in recs if len(r["per_step"]) > step]
            col = [mean([a[i] for a in at]) for i in range(4)]
            cells.append(f"{col[0]:.3g} [{100 * col[1]:.0f}%, {100 * col[2]:.0f}%, {col[3]:.2f}]"
                         + ("" if len(at) == n else f" n={len(at)}") if at else "–")
        grid.append([label, *cells])
    print(markdown_grid(["run", *(f"step {s}" for s in steps_at)], grid))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--offset", type=int, default=1000, help="first ZsRE case (1000+ is the dev slice)")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", nargs="*", help="run only these variants (labels; default: all)")
    parser.add_argument("--steps-at", type=int, nargs="*", default=[0, 2, 5, 10, 20, 34, 69])
    parser.add_argument("--out", type=Path, help="write the per-case records here (JSON), after each case")
    parser.add_argument("--tables-from", type=Path, nargs="+",
                        help="print the tables of --out files (their cases pooled per row) and exit")
    args = parser.parse_args()
    if args.tables_from:
        results: dict[str, list[dict[str, Any]]] = {}
        for path in args.tables_from:  # runs on other cases add their records to the rows they share
            for label, recs in json.loads(path.read_text())["results"].items():
                results.setdefault(label, []).extend(recs)
        print_tables(results, args.steps_at)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    rows = variants()
    if args.rows:
        wanted = set(args.rows) | {"CE ×0.6"}
        unknown = sorted(wanted - {v.label for v in rows})
        if unknown:
            parser.error(f"unknown rows {unknown}; known: {[v.label for v in rows]}")
        rows = [v for v in rows if v.label in wanted]
    lm = load_model(args.model, device="cpu")
    evaluator = Evaluator(lm)
    cases = load_benchmark("zsre", limit=args.limit, offset=args.offset)
    print(f"WISE on {args.model}, ZsRE cases {args.offset}..{args.offset + len(cases) - 1} ({len(cases)} cases); "
          f"OverTone λ {BASE.lam}, n {BASE.n_sigma}, ε {BASE.epsilon} unless stated")
    results = {v.label: [] for v in rows}
    start = time.perf_counter()
    for i, case in enumerate(cases):
        for label, record in run_case(lm, evaluator, case, rows).items():
            results[label].append(record)
        log.info("case %d/%d (%s) done, %.0f s so far", i + 1, len(cases), case.case_id, time.perf_counter() - start)
        if args.out is not None:
            args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))
    print_tables(results, args.steps_at)
    print(f"\nwall time {time.perf_counter() - start:.0f} s at {args.threads} thread(s)")


if __name__ == "__main__":
    main()
