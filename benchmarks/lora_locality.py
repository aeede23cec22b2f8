"""Why LoRA + OverTone loses locality: the filter's sharpening term, measured on development cases.

With λ < 1 the gradient of OverTone's per-token loss w.r.t. a mixed, unclipped token's logits is
λ(p − onehot(y)) + (1 − λ)(p − π_flt) (``OverTone.gradient_terms``): cross-entropy's pull scaled by λ,
plus a term that moves probability mass from outside the top-n-sigma kept set into it. Without the
filter π_flt = p and that term is zero. For every case and variant this script edits with LoRA,
records per step the mean norm of both terms over the target tokens (clipped tokens count as zero:
what the optimiser receives), in logit space and pulled back through the vocabulary head (the
gradient reaching the last hidden state), the share of unclipped tokens and the entropy of the
prediction at the target tokens; after the edit it scores Rel./Gen./Por./Loc. with the field's
evaluator and measures, at the answer positions of the locality probes, the entropy of the
next-token distribution before and after and KL(before ‖ after).

Variants: CE and OverTone at n = 1 (the default), 2, 4 and without the filter; CE and OverTone with
``orth_reg_weight=0`` and with ``variant=lora``. Each runs the host's loop (70 steps); the OverTone
variants also with ``stop_when_clipped=true``, with a CE control trained for the update counts that
OverTone n 1 took under that stop. ΔLoc. is paired per case (``report.stats.paired_difference``).

    nice -n 5 python benchmarks/lora_locality.py --offset 1000 --limit 10 --threads 1 --out /tmp/lora-loc.json
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
from overtone.objectives import IGNORE_INDEX, CrossEntropy, OverTone, OverToneConfig, top_n_sigma_mask
from overtone.report.stats import PairedDifference, paired_difference
from overtone.report.tables import markdown_grid
from overtone.runner.bench import summarize

log = logging.getLogger("lora_locality")
BASE = OverToneConfig(lam=0.5, n_sigma=1.0, epsilon=0.01)  # LoRA's overtone_defaults
CE_TERMS = OverTone(OverToneConfig(lam=1.0, epsilon=0.0))  # CE's gradient as OverTone's label term (Prop. 3.1)


@dataclass(frozen=True)
class Variant:
    label: str
    overtone: OverToneConfig | None  # None: cross-entropy
    settings: dict[str, Any] = field(default_factory=dict)
    matched: str | None = None  # train for the per-case update counts of this row

    def objective(self) -> CrossEntropy | OverTone:
        return CrossEntropy() if self.overtone is None else OverTone(self.overtone)


STOP = ", clip-stop"
MATCHED = "CE, steps of OverTone n 1 clip-stop"
# (run, run it is compared with): OverTone against CE in each setting, the filter against no filter, and
# the all-clipped stop against CE at the same update counts and at 70 steps
PAIRS = [
    ("OverTone n 1", "CE"), ("OverTone w/o flt", "CE"), ("OverTone n 1", "OverTone w/o flt"),
    ("OverTone n 2", "OverTone w/o flt"), ("OverTone n 4", "OverTone w/o flt"),
    ("OverTone n 1, orth 0", "CE, orth 0"), ("OverTone n 1, plain LoRA", "CE, plain LoRA"),
    ("CE, orth 0", "CE"), ("CE, plain LoRA", "CE"),
    ("OverTone n 1" + STOP, MATCHED), ("OverTone w/o flt" + STOP, MATCHED),
    ("OverTone n 1" + STOP, "OverTone w/o flt" + STOP), ("OverTone n 4" + STOP, "OverTone w/o flt" + STOP),
    ("OverTone n 1" + STOP, "CE"), ("OverTone w/o flt" + STOP, "CE"), (MATCHED, "CE"),
]


def variants() -> list[Variant]:
    rows = [
        Variant("CE", None),
        Variant("OverTone n 1", BASE),
        Variant("OverTone n 2", replace(BASE, n_sigma=2.0)),
        Variant("OverTone n 4", replace(BASE, n_sigma=4.0)),
        Variant("OverTone w/o flt", replace(BASE, filter=False)),
        Variant("CE, orth 0", None, {"orth_reg_weight": 0.0}),
        Variant("OverTone n 1, orth 0", BASE, {"orth_reg_weight": 0.0}),
        Variant("CE, plain LoRA", None, {"variant": "lora"}),
        Variant("OverTone n 1, plain LoRA", BASE, {"variant": "lora"}),
    ]
    stops = [replace(v, label=f"{v.label}{STOP}", settings={**v.settings, "stop_when_clipped": True})
             for v in rows if v.overtone is not None]
    stops.append(Variant(MATCHED, None, matched="OverTone n 1" + STOP))
    return rows + stops


class StepRecorder:
    """``on_step``: per step, mean norms of the label and filter terms, share of unclipped tokens, entropy."""

    def __init__(self, objective: OverTone, head: torch.Tensor) -> None:
        self.objective, self.head = objective, head
        # per step: label, filter, label via head, filter via head, unclipped share, entropy, kept-set size,
        # probability mass outside the kept set
        self.rows: list[list[float]] = []

    def __call__(self, info: StepInfo) -> None:
        mask = info.labels.ne(IGNORE_INDEX)
        z, y = info.logits[mask].float(), info.labels[mask]
        label, filt = self.objective.gradient_terms(z, y)
        p = torch.softmax(z, dim=-1)
        entropy = -(p * torch.log_softmax(z, dim=-1)).sum(-1)
        active = info.output.active_tokens / int(mask.sum())
        cfg = self.objective.cfg
        filtered = cfg.filter and cfg.lam < 1
        outside = ~top_n_sigma_mask(z, cfg.n_sigma) if filtered else torch.zeros_like(p, dtype=torch.bool)
        self.rows.append([label.norm(dim=-1).mean().item(), filt.norm(dim=-1).mean().item(),
                          (label @ self.head).norm(dim=-1).mean().item(),
                          (filt @ self.head).norm(dim=-1).mean().item(), active, entropy.mean().item(),
                          (~outside).sum(-1).float().mean().item(), (p * outside).sum(-1).mean().item()])


def answer_distributions(evaluator: Evaluator, probes: Any) -> dict[str, torch.Tensor]:
    """Log-probabilities [n, V] at the answer positions of the locality and reliability rows (full forward)."""
    out = evaluator.answer_logits(probes)
    rows = out.rows()
    return {metric: torch.log_softmax(torch.cat([r for r, (m, _) in zip(rows, probes.groups, strict=True)
                                                 if m == metric]).float(), dim=-1)
            for metric in ("loc", "rel")}


def entropy(log_probs: torch.Tensor) -> float:
    return -(log_probs.exp() * log_probs).sum(-1).mean().item()


def run_case(lm: Any, evaluator: Evaluator, case: Any, rows: Sequence[Variant],
             head: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Every variant's record for one case (a matched-steps row after the row it matches)."""
    records: dict[str, dict[str, Any]] = {}
    before: dict[str, torch.Tensor] | None = None
    for v in rows:
        editor = make_editor("lora", lm, v.objective(), **v.settings)
        pre = evaluator.before(case, record_from=editor.first_layer)
        if before is None:
            before = answer_distributions(evaluator, pre.probes)
        recorder = StepRecorder(OverTone(v.overtone) if v.overtone is not None else CE_TERMS, head)
        budget = None if v.matched is None else records[v.matched]["steps"]
        start = time.perf_counter()
        handle = editor.edit([case], on_step=recorder, steps=budget)
        try:
            cache = pre.predictions.cache
            result = evaluator.after(pre, replay=cache is not None and handle.first_layer >= cache.start)
            after = answer_distributions(evaluator, pre.probes)
        finally:
            handle.revert()
        loc_b, loc_a = before["loc"], after["loc"]
        records[v.label] = {
            "case_id": case.case_id, "pre": result["pre"], "post": result["post"], "steps": handle.stats.steps,
            "stopped_early": handle.stats.stopped_early, "edit_s": time.perf_counter() - start,
            "eval_s": result["eval_s"],
            "h_loc_before": entropy(loc_b), "h_loc_after": entropy(loc_a),
            "kl_loc": (loc_b.exp() * (loc_b - loc_a)).sum(-1).mean().item(),
            "h_rel_before": entropy(before["rel"]), "h_rel_after": entropy(after["rel"]),
            "per_step": recorder.rows,
        }
    return records


def fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def cell(d: PairedDifference, scale: float = 1.0, digits: int = 2) -> str:
    """A paired difference as 'mean ± half-width', starred beyond noise; ``scale`` undoes the metrics' x100."""
    return f"{d.mean / scale:+.{digits}f} ± {d.half_width / scale:.{digits}f}" + ("*" if d.significant else "")


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def print_tables(results: dict[str, list[dict[str, Any]]], rows: Sequence[Variant], steps_at: Sequence[int]) -> None:
    by_label = {v.label: v for v in rows}
    print("\nMetrics (H: mean entropy of the next-token distribution at the locality answer tokens, "
          "before → after the edit; KL loc: KL(before ‖ after) there; H edit: the same at the edit's target tokens)\n")
    table = []
    for label, recs in results.items():
        s = summarize(recs)
        table.append([label, *(fmt(s[m]) for m in ("rel", "gen", "por", "loc", "avg")), str(len(recs)),
                      fmt(mean([r["steps"] for r in recs]), 1),
                      f"{mean([r['h_loc_before'] for r in recs]):.3f} → {mean([r['h_loc_after'] for r in recs]):.3f}",
                      f"{mean([r['kl_loc'] for r in recs]):.3f}",
                      f"{mean([r['h_rel_before'] for r in recs]):.3f} → {mean([r['h_rel_after'] for r in recs]):.4f}"])
    print(markdown_grid(["run", "Rel.", "Gen.", "Por.", "Loc.", "Avg.", "cases", "steps", "H loc", "KL loc", "H edit"],
                        table))
    print("\nPaired differences (first − second run, per case; 95% t-interval, * beyond noise; W/T/L on Loc.)\n")
    table = []
    for other, base in PAIRS:
        if other not in results or base not in results:
            continue
        cells = [f"{other} − {base}"]
        loc = paired_difference(results[base], results[other], "loc")
        cells += [cell(loc), cell(paired_difference(results[base], results[other], "avg"))]
        for key in ("kl_loc", "h_loc_after"):  # the same machinery on a per-case float carried as a metric
            cells.append(cell(paired_difference(*([{"case_id": r["case_id"], "post": {key: r[key]}} for r in recs]
                                                  for recs in (results[base], results[other])), key), 100.0, 3))
        cells.append(f"{loc.wins}/{loc.ties}/{loc.losses}")
        table.append(cells)
    print(markdown_grid(["pair", "ΔLoc.", "ΔAvg.", "ΔKL loc", "ΔH loc after", "W/T/L Loc."], table))
    for title, columns in (("logit space", (0, 1)), ("through the head (gradient at the last hidden state)", (2, 3))):
        print(f"\nMean per-token norm of the label term λ(p − onehot) / the filter term (1 − λ)(p − π_flt), "
              f"{title}; [unclipped share, entropy at the target tokens]; n = cases still training\n")
        grid = []
        for label, recs in results.items():
            cells = []
            for step in steps_at:
                at = [r["per_step"][step] for r in recs if len(r["per_step"]) > step]
                if not at:
                    cells.append("–")
                    continue
                col = [mean([a[i] for a in at]) for i in range(6)]
                cells.append(f"{col[columns[0]]:.3g} / {col[columns[1]]:.3g} [{100 * col[4]:.0f}%, "
                             f"{col[5]:.2f}]" + ("" if len(at) == len(recs) else f" n={len(at)}"))
            grid.append([label, *cells])
        print(markdown_grid(["run", *(f"step {s}" for s in steps_at)], grid))
    print("\nTop-n-sigma kept set at the target tokens: size / probability mass outside it (what the filter term "
          "moves into it)\n")
    grid = []
    for label, recs in results.items():
        if by_label[label].overtone is None or not by_label[label].overtone.filter:
            continue
        cells = []
        for step in steps_at:
            at = [r["per_step"][step] for r in recs if len(r["per_step"]) > step]
            cells.append(f"{mean([a[6] for a in at]):.1f} / {mean([a[7] for a in at]):.3f}" if at else "–")
        grid.append([label, *cells])
    print(markdown_grid(["run", *(f"step {s}" for s in steps_at)], grid))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--offset", type=int, default=1000, help="first ZsRE case (1000+ is the dev slice)")
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", nargs="*", help="run only these variants (labels; default: all)")
    parser.add_argument("--steps-at", type=int, nargs="*", default=[0, 5, 10, 15, 30, 69])
    parser.add_argument("--out", type=Path, help="write the per-case records here (JSON), after each case")
    parser.add_argument("--tables-from", type=Path, nargs="+",
                        help="print the tables of --out files (their cases pooled per row) and exit")
    args = parser.parse_args()
    if args.tables_from:
        results: dict[str, list[dict[str, Any]]] = {}
        for path in args.tables_from:  # runs on other cases add their records to the rows they share
            for label, recs in json.loads(path.read_text())["results"].items():
                results.setdefault(label, []).extend(recs)
        print_tables(results, [v for v in variants() if v.label in results], args.steps_at)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    rows = variants()
    if args.rows:
        unknown = sorted(set(args.rows) - {v.label for v in rows})
        if unknown:
            parser.error(f"unknown rows {unknown}; known: {[v.label for v in rows]}")
        wanted = set(args.rows)
        wanted |= {"CE"} | {v.matched for v in rows if v.label in wanted}
        rows = [v for v in rows if v.label in wanted]  # with CE and the rows they are matched to
    lm = load_model(args.model, device="cpu")
    head = lm.adapter.lm_head.weight.detach().float()
    evaluator = Evaluator(lm)
    cases = load_benchmark("zsre", limit=args.limit, offset=args.offset)
    last = args.offset + len(cases) - 1
    print(f"LoRA (AdaLoRA unless 'plain LoRA') on {args.model}, ZsRE cases {args.offset}..{last} ({len(cases)} cases);"
          f" OverTone λ {BASE.lam}, ε {BASE.epsilon}")
    results = {v.label: [] for v in rows}
    start = time.perf_counter()
    for i, case in enumerate(cases):
        for label, record in run_case(lm, evaluator, case, rows, head).items():
            results[label].append(record)
        log.info("case %d/%d (%s) done, %.0f s so far", i + 1, len(cases), case.case_id, time.perf_counter() - start)
        if args.out is not None:
            args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))
    print_tables(results, rows, args.steps_at)
    print(f"\nwall time {time.perf_counter() - start:.0f} s at {args.threads} thread(s)")


if __name__ == "__main__":
    main()
