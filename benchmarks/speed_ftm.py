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
  bounds OverTone's extra cost.

    python benchmarks/speed_ftm.py --cases 10 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from overtone import Evaluator, edit_and_score, load_benchmark, load_model, make_editor
from overtone.benchmarks import EditCase
from overtone.models import forward_hidden, forward_suffix
from overtone.objectives import CrossEntropy, Objective, OverTone
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cases", type=int, default=10, help="ZsRE cases (first N) to time")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu")
    cases = load_benchmark("zsre", limit=args.cases)
    editor = make_editor("ft-m", lm, CrossEntropy())
    cfg = editor.config
    typical, length = typical_case(lm, cases)
    u_full, u_ref = yardsticks(lm, cases[typical], cfg.layer, args.reps)

    evaluator = Evaluator(lm)
    ours, steps = [], []
    for case in cases:
        record = edit_and_score(editor, evaluator, case)
        ours.append(record["edit_s"] + record["eval_s"])
        steps.append(record["steps"])
    reference = [reference_style_edit(lm, c, cfg.layer, cfg.steps, cfg.lr, cfg.stop_loss) for c in cases]
    per_step = step_times(lm, cases[typical], cfg.layer, {"ce": CrossEntropy(), "overtone": OverTone()},
                          args.reps * 4)

    mean_ours, mean_ref = statistics.mean(ours), statistics.mean(reference)
    print(f"model {args.model}, FT-M layer {cfg.layer}, {len(cases)} ZsRE cases, {args.threads} thread(s), "
          f"typical sequence {length} tokens")
    print(f"yardstick U_full (full fwd+bwd, all params)      {1000 * u_full:8.1f} ms")
    print(f"yardstick U_ref  (reference FT-M step)          {1000 * u_ref:8.1f} ms")
    print(f"{'':<34}{'s/edit':>8}{'U_full':>9}{'U_ref':>8}{'steps':>7}")
    print(f"{'overtone FT-M edit + evaluation':<34}{mean_ours:8.2f}{mean_ours / u_full:9.2f}"
          f"{mean_ours / u_ref:8.2f}{statistics.mean(steps):7.1f}")
    print(f"{'reference-style edit + evaluation':<34}{mean_ref:8.2f}{mean_ref / u_full:9.2f}{mean_ref / u_ref:8.2f}")
    print(f"speed-up over the reference-style procedure: {mean_ref / mean_ours:.2f}x")
    ce, ot = per_step["ce"], per_step["overtone"]
    print(f"one optimisation step: CE {1000 * ce:.1f} ms, OverTone {1000 * ot:.1f} ms "
          f"(OverTone/CE = {ot / ce:.3f})")


if __name__ == "__main__":
    main()
