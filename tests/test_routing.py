"""Real tokens of each row, read from what a decoder block receives."""

from __future__ import annotations

import pytest
import torch

from overtone.models import forward_hidden
from overtone.models.routing import last_token_index, real_tokens
from overtone.tokens import encode_pairs


def block_view(lm, prompts, answers, layer=1):
    """(real-token mask seen by block ``layer``, the batch's own attention mask)."""
    batch = encode_pairs(lm.tokenizer, prompts, answers)
    seen = {}

    def hook(block, args, kwargs):
        seen["real"] = real_tokens(block, args, kwargs)

    handle = lm.adapter.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            forward_hidden(lm.adapter, batch.input_ids, batch.attention_mask)
    finally:
        handle.remove()
    return seen["real"], batch.attention_mask.bool()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padded_batch_marks_the_real_tokens(any_tiny, attention):
    any_tiny.model.set_attn_implementation(attention)
    real, mask = block_view(any_tiny, ["Who wrote the long novel War and Peace?", "Hi"], ["Leo Tolstoy", "Bob"])
    assert real is not None and torch.equal(real, mask)
    last = last_token_index(real, *mask.shape, device=mask.device)
    assert last.tolist() == (mask.sum(dim=-1) - 1).tolist()


def test_unpadded_batch_is_all_real(any_tiny):
    real, mask = block_view(any_tiny, ["Who wrote War and Peace?"], ["Leo Tolstoy"])
    assert real is None or bool(real.all())
    assert last_token_index(real, 1, mask.shape[1], mask.device).item() == mask.shape[1] - 1


def test_sliding_window_layers_still_see_every_real_token(tokenizer):
    from helpers import tiny_model

    lm = tiny_model("gemma3_text", tokenizer)  # window 8, shorter than these sequences
    long = "Which river flows through the old city of Prague and then further north into Germany?"
    for layer in (0, 1):  # sliding and full attention
        real, mask = block_view(lm, [long, "Hi"], ["The Vltava river", "Bob"], layer=layer)
        assert torch.equal(real, mask)
