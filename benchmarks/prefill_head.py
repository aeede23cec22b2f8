"""The prefill's last-position logits on a half-precision model on the CPU: a strided view against an index.

Asking a transformers model for the last position's logits only (``logits_to_keep=1``, as ``generate`` does)
hands the head a strided view; for a bf16 model on the CPU torch's matmul then multiplies each row by its own
copy of the head (pytorch/pytorch#151934). ``evaluation.decoding`` keeps the position by index there. This
script builds a randomly initialised model of Llama-2-7B's widths with ``--layers`` layers in bf16 and times one
prefill of ``--rows`` prompts each way, back to back in one process, with the peak memory above what was live
(the resident set's high-water mark) and whether the two give the same logits.

    python benchmarks/prefill_head.py --layers 1 --rows 8 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
from rehearsal_7b import peak_above, random_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-2-7b", help="llama-2-7b, llama-3-8b or tiny")
    parser.add_argument("--layers", type=int, default=1, help="the shape's widths with this many layers")
    parser.add_argument("--rows", type=int, default=8, help="prompts in the prefill")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = random_model(args.shape, torch.device("cpu"), args.layers)
    prompts = [f"What is the capital city of country number {i} in the list of places?" for i in range(args.rows)]
    enc = lm.tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    keep = {"view": 1, "index": torch.tensor([enc["input_ids"].size(1) - 1])}
    logits, seconds, peaks = {}, {}, {}
    with torch.no_grad():
        for name, how in keep.items():
            with peak_above(lm.device) as peak:
                start = time.perf_counter()
                logits[name] = lm.model(**enc, logits_to_keep=how).logits
                seconds[name] = time.perf_counter() - start
            peaks[name] = peak["peak"] / 2**20
    print(f"{lm.name}, bf16, cpu, {torch.get_num_threads()} threads; prefill of {args.rows} prompts x "
          f"{enc['input_ids'].size(1)} tokens, logits of the last position")
    for name in keep:
        print(f"  {name:<6} {seconds[name]:8.2f} s  peak {peaks[name]:8.0f} MiB")
    print(f"  view / index: {seconds['view'] / seconds['index']:.1f}x the time, "
          f"{peaks['view'] / max(peaks['index'], 1):.1f}x the memory; largest logit difference "
          f"{(logits['view'].float() - logits['index'].float()).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
