"""Short context prefixes that ROME and MEMIT put before a prompt, so an edit holds in other contexts.

Both papers average the key over, and optimise the value on, the prompt alone plus the prompt after
a few short texts sampled from the model itself: top-5 sampling from the seed words "The",
"Therefore", "Because", "I", "You", each text ending in ". ". The reference code samples them again
in every process (and, in the toolkit, for every edit); here they are sampled once per model and
setting from a fixed seed and kept for the life of the model object, so every edit of a run sees the
same prefixes, and the run's configuration records them.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from overtone.models.loading import LoadedModel

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")

# model -> (lengths, seed) -> prefixes
_PREFIXES: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, tuple[str, ...]]] = weakref.WeakKeyDictionary()


def context_prefixes(lm: LoadedModel, lengths: Sequence[Sequence[int]], seed: int = 0) -> tuple[str, ...]:
    """``("",)`` followed by, for each ``(length, count)``, ``count`` sampled texts of ``length`` tokens.

    ``length`` counts the seed word's tokens, as in the reference code; the seed words take turns.
    The same model object, lengths and seed always give the same prefixes.
    """
    key = (tuple((int(n), int(c)) for n, c in lengths), seed)
    for length, count in key[0]:
        if length < 2 or count < 0:
            raise ValueError(f"context lengths must be (length >= 2, count >= 0) pairs, got {(length, count)}")
    per_model = _PREFIXES.setdefault(lm.model, {})
    if key not in per_model:
        per_model[key] = ("", *_sample(lm, key[0], seed))
    return per_model[key]


@torch.no_grad()
def _sample(lm: LoadedModel, lengths: Sequence[tuple[int, int]], seed: int) -> list[str]:
    tokenizer, model = lm.tokenizer, lm.model
    devices = [lm.device] if lm.device.type == "cuda" else []
    prefixes: list[str] = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for length, count in lengths:
            seeds = [tokenizer(SEED_WORDS[i % len(SEED_WORDS)])["input_ids"] for i in range(count)]
            # one sampling call per seed length, so no padding can change what is sampled
            for size in sorted({len(s) for s in seeds}):
                same = [s for s in seeds if len(s) == size]
                new_tokens = max(1, length - size)
                out = model.generate(
                    input_ids=torch.tensor(same, device=lm.device), attention_mask=torch.ones(
                        len(same), size, dtype=torch.long, device=lm.device),
                    do_sample=True, top_k=5, top_p=1.0, temperature=1.0, max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id,
                )
                prefixes += [text + ". " for text in tokenizer.batch_decode(out, skip_special_tokens=True)]
    return prefixes
