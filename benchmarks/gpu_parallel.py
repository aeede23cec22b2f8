"""Parallel single editing on a CUDA device: edits per second (edit + evaluation) at B = 1, 2, 4, .., 64.

With ``--model PATH`` a local checkpoint is edited; without, a randomly initialised model of the
Llama-2-7B shape (32 layers, hidden 4096, MLP 11008, 32 heads; the embedded model's tokenizer and
vocabulary) in bfloat16, which costs what the real model costs (the weights' values do not change the
work). For each B the single-editing runner runs ``--cases-per-b`` x B ZsRE cases (at least 8) as
``overtone bench --parallel B`` does, after a warm-up; printed: seconds per edit, edits per second,
the ratio to B = 1, and the peak device memory above the model's own, per case.

ROME runs with u = k* (``mom2_adjustment`` off, the reference toolkit's Llama setting): a random
model has no second-moment statistics worth computing.

    python benchmarks/gpu_parallel.py --editor ft-m --sizes 1,2,4,8,16,32,64
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from overtone import Evaluator, load_benchmark, load_model, make_editor
from overtone.models.loading import DEFAULT_MODEL, prepare_model
from overtone.objectives import CrossEntropy
from overtone.runner import ResultStore, run_continual


def seven_b(device: torch.device):
    """A random Llama-2-7B-shaped model in bfloat16 with the embedded model's tokenizer."""
    tokenizer = load_model(DEFAULT_MODEL, device="cpu").tokenizer
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return prepare_model(model, tokenizer, name="random-llama-7b-shape")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local checkpoint (default: random 7B-shaped Llama)")
    parser.add_argument("--editor", default="ft-m", choices=["ft-m", "lora", "rome"])
    parser.add_argument("--sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--cases-per-b", type=int, default=2, help="cases timed per B, as a multiple of B")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    device = torch.device("cuda")
    lm = load_model(args.model, device="cuda", dtype="bf16") if args.model else seven_b(device)
    settings = {"mom2_adjustment": False} if args.editor == "rome" else {}
    editor = make_editor(args.editor, lm, CrossEntropy(), **settings)
    evaluator = Evaluator(lm)
    sizes = [int(x) for x in args.sizes.split(",")]
    cases = load_benchmark("zsre", limit=max(8, args.cases_per_b * max(sizes)))
    base = torch.cuda.memory_allocated(device)
    estimate = editor.case_memory().total / 2**20
    print(f"{lm.name}, {args.editor}, {torch.cuda.get_device_name(device)}, model {base / 2**30:.1f} GiB; "
          f"estimated {estimate:.0f} MiB per case (--parallel auto)")

    def run(selection, size: int) -> float:
        with tempfile.TemporaryDirectory() as scratch:
            torch.cuda.synchronize()
            start = time.perf_counter()
            with ResultStore(scratch, {}) as store:
                run_continual(editor, evaluator, selection, store, parallel=size)
            torch.cuda.synchronize()
            return time.perf_counter() - start

    run(cases[:2], 2)  # warm-up: kernels, allocator
    print(f"{'B':>4}{'cases':>7}{'s/edit':>9}{'edits/s':>9}{'vs B=1':>8}{'peak MiB/case':>15}")
    first = None
    for size in sizes:
        selection = cases[: max(8, args.cases_per_b * size)]
        torch.cuda.reset_peak_memory_stats(device)
        seconds = run(selection, size) / len(selection)
        first = first or seconds
        peak = (torch.cuda.max_memory_allocated(device) - base) / size / 2**20
        print(f"{size:>4}{len(selection):>7}{seconds:9.3f}{1 / seconds:9.2f}{first / seconds:7.2f}x{peak:15.0f}")


if __name__ == "__main__":
    main()
