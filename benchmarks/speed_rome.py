"""Speed of a ROME (or MEMIT) edit with its evaluation, in units of one forward+backward pass.

The yardsticks are those of ``speed_ftm.py`` (imported from it), timed in the same process:
``U_full`` is a full forward and backward of the model, ``U_ref`` one step of the reference toolkit's
FT-M. The reference toolkit's ROME takes about 88 s per edit on the embedded model (docs/anchors),
about 440 ``U_ref``. Then, on the first N ZsRE cases:

* ``overtone``: the editor's edit with its evaluation (pre pass, edit, post pass, revert), CE objective,
  with the share of the edit itself (key, value optimisation, update);
* one-time costs: building the editor (sampling the context prefixes once per model, reading the
  cached statistics and inverting C);
* ``reference-style``: one value-optimisation step the way the reference code runs it (every row
  through the whole model, logits at every position), times the steps our edits took and times 25;
* parallel single editing (``--parallel``), timed as in ``speed_ftm.py``: cost per edit with B cases
  edited at once, against B = 1 and against the reference-style value steps (x the steps our edits
  took; a lower bound of the reference's cost, which adds its evaluation), in the same run.

    python benchmarks/speed_rome.py --cases 16 --threads 1 --parallel 1,4,8,16
    python benchmarks/speed_rome.py --editor memit --cases 8 --parallel 1,4,8
"""

from __future__ import annotations

import statistics
import time

import torch
from speed_ftm import (
    REFERENCE,
    Row,
    load,
    median_time,
    print_parallel,
    speed_arguments,
    time_parallel,
    typical_case,
    yardsticks,
)

from overtone import Evaluator, load_benchmark, load_model, make_editor
from overtone.editors import ft_m
from overtone.editors.locate import encode_rows, encode_subject_row
from overtone.objectives import CrossEntropy


def reference_style_step(lm, editor, case, reps: int) -> float:
    """Median time of one value step with full forwards and full logits (the reference code's procedure)."""
    layer = editor.first_layer
    rows = encode_rows(lm.tokenizer, case, editor.prefixes, with_answer=True)
    kl = encode_subject_row(lm.tokenizer, case, "{} is a")
    length = max(len(r.ids) for r in [*rows, kl])
    ids = torch.zeros(len(rows) + 1, length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate([*rows, kl]):
        ids[i, : len(row.ids)] = torch.tensor(row.ids)
        mask[i, : len(row.ids)] = 1
    delta = torch.zeros(lm.model.config.hidden_size, requires_grad=True)
    lookups = torch.tensor([r.lookup for r in [*rows, kl]])

    def inject(_module, _args, output):
        return output + torch.zeros_like(output).index_put((torch.arange(len(lookups)), lookups), delta)

    handle = lm.adapter.module("mlp_out", layer).register_forward_hook(inject)

    def step() -> None:
        logits = lm.model(input_ids=ids, attention_mask=mask).logits
        logp = torch.log_softmax(logits, dim=-1)
        loss = -sum(logp[i, j - 1, row.ids[j]] for i, row in enumerate(rows) for j in row.answer)
        loss = loss + logp[-1, kl.lookup].exp().sum()
        loss.backward()
        delta.grad = None

    try:
        return median_time(step, reps)
    finally:
        handle.remove()


def main() -> None:
    parser = speed_arguments(__doc__, cases=16, reps=5)
    parser.add_argument("--editor", default="rome", choices=["rome", "memit"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu")
    cases = load_benchmark("zsre", limit=args.cases)

    start = time.perf_counter()
    editor = make_editor(args.editor, lm, CrossEntropy())
    build_s = time.perf_counter() - start
    typical = cases[typical_case(lm, cases)[0]]
    u_full, u_ref = yardsticks(lm, typical, ft_m.default_layer(lm.adapter.num_layers), args.reps)

    started = load()
    rows = time_parallel(editor, Evaluator(lm), cases, args.parallel)
    reference_step = reference_style_step(lm, editor, typical, args.reps)
    mean_total, mean_steps = rows[1].per_edit, statistics.mean(rows[1].steps)
    settings = editor.describe()
    where = f"layer {settings['layer']}" if args.editor == "rome" else f"layers {settings['layers']}"
    print(f"model {args.model}, {args.editor} {where}, {len(editor.prefixes)} prompt variants, "
          f"{len(cases)} ZsRE cases, {args.threads} thread(s); {started} at the start, {load()} at the end")
    print(f"yardstick U_full (full fwd+bwd, all params)      {1000 * u_full:8.1f} ms")
    print(f"yardstick U_ref  (reference FT-M step)          {1000 * u_ref:8.1f} ms")
    print(f"{'':<38}{'s/edit':>8}{'U_full':>9}{'U_ref':>8}{'steps':>7}")
    print(f"{'overtone edit + evaluation':<38}{mean_total:8.2f}{mean_total / u_full:9.2f}"
          f"{mean_total / u_ref:8.2f}{mean_steps:7.1f}")
    print(f"{'one-time: build the editor':<38}{build_s:8.2f}   (context prefixes, statistics)")
    for label, n in ((f"reference-style value steps x {mean_steps:.1f}", mean_steps),
                     ("reference-style value steps x 25", 25)):
        print(f"{label:<38}{n * reference_step:8.2f}{n * reference_step / u_full:9.2f}"
              f"{n * reference_step / u_ref:8.2f}")
    print(f"one reference-style value step {1000 * reference_step:.0f} ms")
    print()
    rows[REFERENCE] = Row(mean_steps * reference_step * len(cases), len(cases))
    print_parallel(rows, args.editor.upper(), len(cases), f"{REFERENCE} value steps")


if __name__ == "__main__":
    main()
