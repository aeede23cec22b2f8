"""Distances between MELO's keys, to choose its radius for a model.

A MELO edit switches its LoRA block on for a sequence whose key (the residual stream entering the key
layer, at the last token) lies within a cluster's radius of the edit's key. The radius should take in
the edit's paraphrases and leave out unrelated sequences. For each case of a benchmark slice this
measures the distance from the edit's key (``prompt + " " + target``) to the keys of its rephrases
(``rephrase + " " + target``), its portability probes and its locality probes, and from every
locality probe to the nearest edit key of the slice. It prints quantiles, the share of each kind
inside candidate radii, and a suggestion: halfway between the 90th percentile of the rephrase
distances and the 5th percentile of the locality-to-nearest-edit distances.

    python benchmarks/melo_key_distances.py --model smollm2-135m --layers 22 --offset 1000 --limit 301
"""

from __future__ import annotations

import argparse

import torch

from overtone import load_benchmark, load_model
from overtone.editors.melo import sequence_keys

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.9, 0.95)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs="+", required=True, help="key layers to measure")
    parser.add_argument("--dataset", default="zsre")
    parser.add_argument("--offset", type=int, default=1000, help="first case (ZsRE 1000+ is the dev slice)")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--radii", type=float, nargs="*", default=[], help="candidate radii to report")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu")
    cases = load_benchmark(args.dataset, limit=args.limit, offset=args.offset)
    print(f"{args.model}, {args.dataset} cases {args.offset}..{args.offset + len(cases) - 1}: distances between keys")
    for layer in args.layers:
        edits, kinds = [], {"rephrase": [], "portability": [], "locality": []}
        locality_keys = []
        for case in cases:
            rows = {"edit": [(case.prompt, case.target)], "rephrase": [(r, case.target) for r in case.rephrases],
                    "portability": [(p.prompt, p.answer) for ps in case.portability.values() for p in ps],
                    "locality": [(p.prompt, p.answer) for ps in case.locality.values() for p in ps]}
            pairs = [pair for group in rows.values() for pair in group]
            keys = sequence_keys(lm, layer, [p for p, _ in pairs], [a for _, a in pairs]).split(
                [len(group) for group in rows.values()])
            edit = keys[0][0]
            edits.append(edit)
            for kind, group in zip(rows, keys, strict=True):
                if kind != "edit":
                    kinds[kind].append((group - edit).norm(dim=-1))
            locality_keys.append(keys[3])
        all_edits = torch.stack(edits)
        distances = {k: torch.cat(v) for k, v in kinds.items()}
        distances["locality-to-nearest-edit"] = torch.cdist(torch.cat(locality_keys), all_edits).min(dim=-1).values
        nearest = torch.cdist(all_edits, all_edits) + torch.eye(len(edits)) * torch.finfo(torch.float32).max
        distances["edit-to-nearest-edit"] = nearest.min(dim=-1).values
        q = torch.tensor(QUANTILES)
        print(f"\nkey layer {layer}: key norm median {all_edits.norm(dim=-1).median().item():.1f}")
        print(f"  {'distance from the edit key to':28s} " + " ".join(f"{int(100 * x):>6d}%" for x in QUANTILES)
              + "      n")
        for kind, values in distances.items():
            print(f"  {kind:28s} " + " ".join(f"{v:7.1f}" for v in torch.quantile(values, q).tolist())
                  + f" {values.numel():6d}")
        suggestion = (torch.quantile(distances["rephrase"], 0.9) + torch.quantile(
            distances["locality-to-nearest-edit"], 0.05)).item() / 2
        for radius in sorted({*args.radii, round(suggestion)}):
            inside = {k: (v <= radius).float().mean().item() for k, v in distances.items()}
            print(f"  radius {radius:6.1f}: inside " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in inside.items()))
        print(f"  suggested radius: {suggestion:.0f}")


if __name__ == "__main__":
    main()
