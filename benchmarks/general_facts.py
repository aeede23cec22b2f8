"""Select the general facts of the ability check (src/overtone/data/ability/general_facts.json).

The facts are MQuAKE-hard's single-hop facts of the unedited world (``single_hops`` of every record:
cloze prompt, answer, Wikidata aliases), one per distinct cloze, in file order. The embedded model
answers each cloze greedily with the ability check's rule (wild stop rule, at most 16 new tokens);
a fact is kept when the answer or an alias occurs in the reply as whole words, and at most ``--per-answer``
facts share one answer (otherwise "citizen of the United States of America" would dominate). Aliases
that occur in the prompt itself are dropped ("Obama" for "Michelle Obama is married to"), so repeating
the prompt never counts as knowing the fact, and so are aliases of one or two characters ("it" for
Italian, "NA" for North America), which common words would match.

    python benchmarks/general_facts.py --out src/overtone/data/ability/general_facts.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from overtone import load_model
from overtone.benchmarks import DATA_DIR
from overtone.evaluation.ability import AbilityMonitor, AbilitySettings, Fact
from overtone.evaluation.wild import contains, normalize_answer

SOURCE = "mquake/MQuAKE-hard.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--per-answer", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    records = json.loads((DATA_DIR / SOURCE).read_text(encoding="utf-8"))
    candidates: dict[str, dict] = {}
    for i, record in enumerate(records):
        for j, hop in enumerate(record["single_hops"]):
            aliases = [a for a in hop["answer_alias"]
                       if len(normalize_answer(a)) > 2 and not contains(hop["cloze"], [a])]
            candidates.setdefault(hop["cloze"], {"prompt": hop["cloze"], "answer": hop["answer"], "aliases": aliases,
                                                 "source": f"{SOURCE} record {i} single_hops[{j}]"})
    facts = list(candidates.values())
    monitor = AbilityMonitor(load_model(args.model, device="cpu"), AbilitySettings(),
                             [Fact(f["prompt"], (f["answer"], *f["aliases"])) for f in facts])
    right = []
    for start in range(0, len(facts), args.batch):
        right += [ok for ok, _ in monitor._answers(monitor.facts[start: start + args.batch])]
    per_answer: dict[str, int] = {}
    kept = []
    for fact, ok in zip(facts, right, strict=True):
        key = normalize_answer(fact["answer"])
        if ok and per_answer.get(key, 0) < args.per_answer:
            per_answer[key] = per_answer.get(key, 0) + 1
            kept.append(fact)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(kept, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(facts)} distinct clozes, {sum(right)} answered right by {args.model}, {len(kept)} kept in {args.out}")


if __name__ == "__main__":
    main()
