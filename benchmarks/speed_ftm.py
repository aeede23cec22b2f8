"""Speed of an FT-M edit with its evaluation, in units of one forward+backward pass, measured in one run.

Yardsticks, timed on a typical edit sequence (the median-length ``prompt + " " + target`` of the cases):

* ``U_full``: one full forward + full backward of the model (every parameter gets a gradient), i.e.
  what one training step of the whole model costs.
* ``U_ref``: one step of the reference toolkit's FT-M: a full forward with logits at every position,
  backward down to the edited ``down_proj`` only.

Then, on the same cases and in the same process:

* ``overtone``: our FT-M edit with its evaluation (pre pass, edit, post pass, revert), CE objective;
* ``reference-style``: the reference toolkit's procedure re-enacted with the same model: 4 separate
  evaluation forwards before and 4 after (rewrite, rephrase, portability, locality), and full
  forward+backward steps with the same early stop;
* the mean time of one optimisation step with CE and with OverTone (interleaved, median), which
  bounds OverTone's extra cost;
* parallel single editing (``--parallel``): the cost per edit, evaluation included, with B cases edited
  at once for each B of the list, against B = 1 (one case at a time, the path above) and against the
  reference-style procedure, each B run by the single-editing runner as ``overtone bench --parallel B``
  runs it. The cases run in blocks of one runner window of the largest B (4 B cases); within each block
  every B (and the reference-style procedure) runs in turn, the order rotating from block to block, so
  a drifting machine load hits every row alike. The steps column checks that every B trained the same
  steps.

    python benchmarks/speed_ftm.py --cases 64 --threads 1 --parallel 1,4,8,16
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from overtone import Evaluator, load_benchmark, load_model, make_editor
from overtone.benchmarks import EditCase
from overtone.models import forward_hidden, forward_suffix
from overtone.objectives import CrossEntropy, Objective, OverTone
from overtone.runner import ResultStore, read_run, run_continual
from overtone.runner.continual import PARALLEL_WINDOW
from overtone.tokens import encode_pairs


def typical_case(lm, cases: list[EditCase]) -> tuple[int, int]:
    """Index and token length of the median-length edit sequence."""
    lengths = [encode_pairs(lm.tokenizer, [c.prompt], [c.target]).input_ids.shape[1] for c in cases]
    length, index = sorted(zip(lengths, range(len(cases)), strict=True))[len(cases) // 2]
    return index, length


def median_time(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def yardsticks(lm, case: EditCase, layer: int, reps: int) -> tuple[float, float]:
    model = lm.model
    batch = encode_pairs(lm.tokenizer, [case.prompt], [case.target], lm.device)
    labels = target_labels(batch)

    def full_step() -> None:
        model.requires_grad_(True)
        model(batch.input_ids, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)

    weight = lm.adapter.weight("mlp_out", layer)

    def reference_step() -> None:
        weight.requires_grad_(True)
        model(batch.input_ids, labels=labels).loss.backward()
        weight.grad = None
        weight.requires_grad_(False)

    return median_time(full_step, reps), median_time(reference_step, reps)


def reference_style_probes(lm, case: EditCase) -> Callable[[], None]:
    """The reference toolkit's evaluation: one forward per probe kind, logits at every position."""
    probes = [(case.prompt, case.target), (case.rephrases[0], case.target)]
    probes += [(p.prompt, p.answer) for group in (case.portability, case.locality) for ps in group.values()
               for p in ps[:1]]
    batches = [encode_pairs(lm.tokenizer, [prompt], [answer], lm.device) for prompt, answer in probes]

    def evaluate() -> None:
        with torch.no_grad():
            for b in batches:
                lm.model(b.input_ids).logits.argmax(-1)

    return evaluate


def target_labels(batch) -> torch.Tensor:
    """HF-style labels: the target token ids at their own positions, -100 elsewhere."""
    labels = torch.full_like(batch.input_ids, -100)
    labels[0, batch.positions[0] + 1] = batch.labels[0]
    return labels


def reference_style_edit(lm, case: EditCase, layer: int, steps: int, lr: float, stop: float) -> float:
    """The reference toolkit's FT-M procedure with separate full forwards: seconds for one case."""
    model = lm.model
    start = time.perf_counter()
    evaluate = reference_style_probes(lm, case)
    evaluate()
    batch = encode_pairs(lm.tokenizer, [case.prompt], [case.target], lm.device)
    labels = target_labels(batch)
    weight = lm.adapter.weight("mlp_out", layer)
    original = weight.detach().clone()
    weight.requires_grad_(True)
    optimiser = torch.optim.Adam([weight], lr=lr)
    for _ in range(steps):
        loss = model(batch.input_ids, labels=labels).loss
        if loss.item() < stop:
            break
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    weight.requires_grad_(False)
    evaluate()
    with torch.no_grad():
        weight.copy_(original)
    return time.perf_counter() - start


def step_times(lm, case: EditCase, layer: int, objectives: dict[str, Objective], reps: int) -> dict[str, float]:
    """Median time of one optimisation step (suffix forward, loss, backward, Adam) per objective."""
    adapter = lm.adapter
    batch = encode_pairs(lm.tokenizer, [case.prompt], [case.target], lm.device)
    weight = adapter.weight("mlp_out", layer)
    original = weight.detach().clone()
    weight.requires_grad_(True)
    _, cache = forward_hidden(adapter, batch.input_ids, batch.attention_mask, layer)
    optimiser = torch.optim.Adam([weight], lr=1e-6)

    def step(objective: Objective) -> None:
        out = objective(adapter.logits(batch.gather(forward_suffix(adapter, cache))), batch.labels)
        optimiser.zero_grad(set_to_none=True)
        out.loss.backward()
        optimiser.step()

    samples: dict[str, list[float]] = {name: [] for name in objectives}
    for _ in range(reps):  # interleaved, so drifting machine load hits both alike
        for name, objective in objectives.items():
            start = time.perf_counter()
            step(objective)
            samples[name].append(time.perf_counter() - start)
    weight.requires_grad_(False)
    with torch.no_grad():
        weight.copy_(original)
    return {name: statistics.median(ts) for name, ts in samples.items()}


@dataclass
class Row:
    """Wall time of one way of editing the cases, summed over the blocks."""

    seconds: float = 0.0
    edits: int = 0
    steps: list[float] = field(default_factory=list)

    @property
    def per_edit(self) -> float:
        return self.seconds / self.edits


REFERENCE = "reference-style"


def time_parallel(editor, evaluator, cases: Sequence[EditCase], sizes: Sequence[int],
                  reference: Callable[[EditCase], object] | None = None) -> dict[int | str, Row]:
    """Seconds per edit (edit + evaluation + revert) for each number of cases at once, interleaved by blocks.

    Every B runs the single-editing runner as ``overtone bench --parallel B`` does (B = 1: one case at a
    time), into a scratch run directory. ``reference(case)`` re-enacts the reference toolkit's procedure.
    """
    block = PARALLEL_WINDOW * max(sizes)  # one window of the largest B: its groups are chosen as in a run
    ways: list[int | str] = [*sizes, *([REFERENCE] if reference else [])]
    rows: dict[int | str, Row] = {way: Row() for way in ways}
    for number, first in enumerate(range(0, len(cases), block)):
        chunk = cases[first: first + block]
        for way in ways[number % len(ways):] + ways[: number % len(ways)]:
            with tempfile.TemporaryDirectory() as scratch:
                start = time.perf_counter()
                if way == REFERENCE:
                    assert reference is not None
                    for case in chunk:
                        reference(case)
                else:
                    with ResultStore(scratch, {}) as store:
                        run_continual(editor, evaluator, chunk, store, parallel=int(way))
                rows[way].seconds += time.perf_counter() - start
                if way != REFERENCE:
                    rows[way].steps += [r["steps"] for r in read_run(scratch)[1]]
            rows[way].edits += len(chunk)
    return rows


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def print_parallel(rows: dict[int | str, Row], label: str, cases: int, reference: str = REFERENCE) -> None:
    """The parallel table: seconds and edits per second for each B, and the ratios to B = 1 and to the reference."""
    sizes = [w for w in rows if w != REFERENCE]
    block = PARALLEL_WINDOW * max(sizes)  # type: ignore[type-var]
    print(f"{label}: parallel single editing, {cases} cases, blocks of {block} interleaved")
    print(f"{'':<30}{'s/edit':>8}{'edits/s':>9}{'vs B=1':>8}{'vs ref':>8}{'steps':>7}")
    base = rows[1].per_edit if 1 in rows else None
    ref = rows[REFERENCE].per_edit if REFERENCE in rows else None
    for way, row in rows.items():
        name = reference if way == REFERENCE else f"B = {way}"
        versus_one = f"{base / row.per_edit:7.2f}x" if base else f"{'-':>8}"
        versus_ref = f"{ref / row.per_edit:7.2f}x" if ref else f"{'-':>8}"
        steps = f"{statistics.mean(row.steps):7.1f}" if row.steps else ""
        print(f"{name:<30}{row.per_edit:8.2f}{1 / row.per_edit:9.3f}{versus_one}{versus_ref}{steps}")


def sizes_option(text: str) -> list[int]:
    sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    if sizes and (sizes[0] < 1 or 1 not in sizes):
        raise SystemExit("--parallel: sizes >= 1, including 1 (the baseline)")
    return sizes


def speed_arguments(description: str | None, cases: int, reps: int) -> argparse.ArgumentParser:
    """The options every speed script takes (each adds its own)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cases", type=int, default=cases, help="ZsRE cases (first N) to time")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--parallel", type=sizes_option, default=sizes_option("1,4,8,16"),
                        help="numbers of cases edited at once, comma-separated (1 included)")
    return parser


def print_units(u_full: float, u_ref: float, label: str, ours: list[float], steps: list[int],
                reference: list[float]) -> None:
    """The yardsticks, then seconds per edit in both units for ours and the reference-style procedure."""
    mean_ours, mean_ref = statistics.mean(ours), statistics.mean(reference)
    print(f"yardstick U_full (full fwd+bwd, all params)      {1000 * u_full:8.1f} ms")
    print(f"yardstick U_ref  (reference FT-M step)          {1000 * u_ref:8.1f} ms")
    print(f"{'':<34}{'s/edit':>8}{'U_full':>9}{'U_ref':>8}{'steps':>7}")
    print(f"{label:<34}{mean_ours:8.2f}{mean_ours / u_full:9.2f}{mean_ours / u_ref:8.2f}{statistics.mean(steps):7.1f}")
    print(f"{'reference-style edit + evaluation':<34}{mean_ref:8.2f}{mean_ref / u_full:9.2f}{mean_ref / u_ref:8.2f}")
    print(f"speed-up over the reference-style procedure: {mean_ref / mean_ours:.2f}x")


def main() -> None:
    args = speed_arguments(__doc__, cases=64, reps=15).parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu")
    cases = load_benchmark("zsre", limit=args.cases)
    editor = make_editor("ft-m", lm, CrossEntropy())
    cfg = editor.config
    typical, length = typical_case(lm, cases)
    started = load()
    u_full, u_ref = yardsticks(lm, cases[typical], cfg.layer, args.reps)

    rows = time_parallel(editor, Evaluator(lm), cases, args.parallel,
                         lambda c: reference_style_edit(lm, c, cfg.layer, cfg.steps, cfg.lr, cfg.stop_loss))
    per_step = step_times(lm, cases[typical], cfg.layer, {"ce": CrossEntropy(), "overtone": OverTone()},
                          args.reps * 4)

    print(f"model {args.model}, FT-M layer {cfg.layer}, {len(cases)} ZsRE cases, {args.threads} thread(s), "
          f"typical sequence {length} tokens; {started} at the start, {load()} at the end")
    one = rows[1]
    print_units(u_full, u_ref, "overtone FT-M edit + evaluation", [one.per_edit], one.steps,
                [rows[REFERENCE].per_edit])
    ce, ot = per_step["ce"], per_step["overtone"]
    print(f"one optimisation step: CE {1000 * ce:.1f} ms, OverTone {1000 * ot:.1f} ms "
          f"(OverTone/CE = {ot / ce:.3f})")
    print()
    print_parallel(rows, "FT-M", len(cases))


if __name__ == "__main__":
    main()
