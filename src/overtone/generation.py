"""Greedy completions, to show what an edit did to the model's answers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from overtone.models.loading import LoadedModel


@torch.no_grad()
def greedy_complete(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 12) -> list[str]:
    """The greedy continuation of each prompt (one at a time, so no padding can change the result)."""
    completions = []
    for prompt in prompts:
        enc = lm.tokenizer(prompt, return_tensors="pt").to(lm.device)
        out = lm.model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id
        )
        completions.append(lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return completions
