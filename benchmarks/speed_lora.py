"""Speed of a LoRA edit with its evaluation, in forward+backward units, measured in one run.

Same yardsticks as ``speed_ftm.py`` (``U_full``: full forward + full backward; ``U_ref``: the reference
toolkit's FT-M step). Compared on the same cases:

* ``overtone``: our LoRA editor with its defaults (AdaLoRA, q/v of every layer, 70 steps) and its
  evaluation (one batched pre pass, one post pass, adapters removed);
* ``reference-style``: the reference toolkit's procedure re-enacted: peft ``get_peft_model``, the HF
  forward with labels (logits at every position), 70 steps, and 4 + 4 separate evaluation forwards.

    python benchmarks/speed_lora.py --cases 3 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import get_peft_model
from speed_ftm import reference_style_probes, target_labels, typical_case, yardsticks

from overtone import Evaluator, edit_and_score, load_benchmark, load_model, make_editor
from overtone.benchmarks import EditCase
from overtone.editors.lora import ADAPTER, LoRA, _orthogonality
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
            loss = loss + cfg.orth_reg_weight * _orthogonality(lm.model)
        loss.backward()
        optimiser.step()
    evaluate()
    peft_model.unload()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cases", type=int, default=3, help="ZsRE cases (first N) to time")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu")
    cases = load_benchmark("zsre", limit=args.cases)
    typical, length = typical_case(lm, cases)
    ftm_layer = make_editor("ft-m", lm, CrossEntropy()).config.layer
    u_full, u_ref = yardsticks(lm, cases[typical], ftm_layer, args.reps)

    editor = make_editor("lora", lm, CrossEntropy())
    evaluator = Evaluator(lm)
    ours, steps = [], []
    for case in cases:
        record = edit_and_score(editor, evaluator, case)
        ours.append(record["edit_s"] + record["eval_s"])
        steps.append(record["steps"])
    reference = [reference_style_edit(lm, editor, c) for c in cases]

    mean_ours, mean_ref = statistics.mean(ours), statistics.mean(reference)
    print(f"model {args.model}, LoRA {editor.config.variant} on {len(editor.target_modules)} modules, "
          f"{len(cases)} ZsRE cases, {args.threads} thread(s), typical sequence {length} tokens")
    print(f"yardstick U_full (full fwd+bwd, all params)      {1000 * u_full:8.1f} ms")
    print(f"yardstick U_ref  (reference FT-M step)          {1000 * u_ref:8.1f} ms")
    print(f"{'':<34}{'s/edit':>8}{'U_full':>9}{'U_ref':>8}{'steps':>7}")
    print(f"{'overtone LoRA edit + evaluation':<34}{mean_ours:8.2f}{mean_ours / u_full:9.2f}"
          f"{mean_ours / u_ref:8.2f}{statistics.mean(steps):7.1f}")
    print(f"{'reference-style edit + evaluation':<34}{mean_ref:8.2f}{mean_ref / u_full:9.2f}{mean_ref / u_ref:8.2f}")
    print(f"speed-up over the reference-style procedure: {mean_ref / mean_ours:.2f}x")


if __name__ == "__main__":
    main()
