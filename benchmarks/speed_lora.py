"""Speed of a LoRA edit with its evaluation, in forward+backward units, measured in one run.

Same yardsticks as ``speed_ftm.py`` (``U_full``: full forward + full backward; ``U_ref``: the reference
toolkit's FT-M step). Compared on the same cases:

* ``overtone``: our LoRA editor with its defaults (AdaLoRA, q/v of every layer, 70 steps) and its
  evaluation (one batched pre pass, one post pass, adapters removed);
* ``reference-style``: the reference toolkit's procedure re-enacted: peft ``get_peft_model``, the HF
  forward with labels (logits at every position), 70 steps, and 4 + 4 separate evaluation forwards;
* parallel single editing (``--parallel``), timed as in ``speed_ftm.py``: cost per edit with B cases
  edited at once against B = 1 and the reference-style procedure, interleaved in the same run.

    python benchmarks/speed_lora.py --cases 16 --threads 1 --parallel 1,4,8,16
"""

from __future__ import annotations

import time

import torch
from peft import get_peft_model
from speed_ftm import (
    REFERENCE,
    load,
    print_parallel,
    print_units,
    reference_style_probes,
    speed_arguments,
    target_labels,
    time_parallel,
    typical_case,
    yardsticks,
)

from overtone import Evaluator, load_benchmark, load_model, make_editor
from overtone.benchmarks import EditCase
from overtone.editors.lora import ADAPTER, LoRA, orthogonality
from overtone.objectives import CrossEntropy
from overtone.tokens import encode_pairs


def reference_style_edit(lm, editor: LoRA, case: EditCase) -> float:
    """Seconds for one case the reference toolkit's way (same adapter config, same steps)."""
    cfg = editor.config
    start = time.perf_counter()
    evaluate = reference_style_probes(lm, case)
    evaluate()
    peft_model = get_peft_model(lm.model, editor._peft_config(), adapter_name=ADAPTER)
    batch = encode_pairs(lm.tokenizer, [case.prompt], [case.target], lm.device)
    labels = target_labels(batch)
    params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    optimiser = torch.optim.Adam(params, lr=cfg.lr)
    for _ in range(cfg.steps):
        optimiser.zero_grad()
        loss = lm.model(batch.input_ids, labels=labels).loss
        if cfg.variant == "adalora":
            layers = [lm.model.get_submodule(path) for path in editor.target_modules]
            loss = loss + cfg.orth_reg_weight * orthogonality([(m.lora_A[ADAPTER], m.lora_B[ADAPTER]) for m in layers])
        loss.backward()
        optimiser.step()
    evaluate()
    peft_model.unload()
    return time.perf_counter() - start


def main() -> None:
    args = speed_arguments(__doc__, cases=16, reps=10).parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu")
    cases = load_benchmark("zsre", limit=args.cases)
    typical, length = typical_case(lm, cases)
    started = load()
    ftm_layer = make_editor("ft-m", lm, CrossEntropy()).config.layer
    u_full, u_ref = yardsticks(lm, cases[typical], ftm_layer, args.reps)

    editor = make_editor("lora", lm, CrossEntropy())
    rows = time_parallel(editor, Evaluator(lm), cases, args.parallel, lambda c: reference_style_edit(lm, editor, c))

    print(f"model {args.model}, LoRA {editor.config.variant} on {len(editor.target_modules)} modules, "
          f"{len(cases)} ZsRE cases, {args.threads} thread(s), typical sequence {length} tokens; "
          f"{started} at the start, {load()} at the end")
    print_units(u_full, u_ref, "overtone LoRA edit + evaluation", [rows[1].per_edit], rows[1].steps,
                [rows[REFERENCE].per_edit])
    print()
    print_parallel(rows, "LoRA", len(cases))


if __name__ == "__main__":
    main()
