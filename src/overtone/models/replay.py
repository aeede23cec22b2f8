"""Run only the layers an edit can change.

An editor that modifies layer L and above leaves the residual stream entering layer L untouched. So
one full forward pass records, for a batch, the hidden state entering layer L and the keyword
arguments (attention mask, rotary embeddings, ...) that every block from L on received; afterwards
``suffix`` recomputes the final hidden states by running blocks L..N-1 alone. The arguments are
captured with forward pre-hooks rather than rebuilt, so per-layer differences (Gemma's sliding and
global attention) are reproduced exactly, and the result is bit-identical to a full pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from overtone.models.adapters import ModelAdapter


@dataclass
class SuffixCache:
    """Inputs of blocks ``start..N-1`` for one batch, recorded during a full pass."""

    start: int
    hidden: torch.Tensor  # [B, L, H] residual stream entering block ``start``
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)


def _split_hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, tuple, dict]:
    """Separate a block's hidden-state input from its other arguments."""
    if args:
        return args[0], args[1:], kwargs
    rest = dict(kwargs)
    return rest.pop("hidden_states"), (), rest


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def forward_hidden(
    adapter: ModelAdapter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    record_from: int | None = None,
) -> tuple[torch.Tensor, SuffixCache | None]:
    """Final (normed) hidden states [B, L, H] of a full pass; optionally record a suffix cache.

    Gradients flow as usual: the caller decides with ``torch.no_grad`` or not.
    """
    model = adapter.model
    cache: SuffixCache | None = None
    handles = []
    if record_from is not None:
        adapter.check_layer(record_from)
        cache = SuffixCache(start=record_from, hidden=torch.empty(0))

        def record(index: int):
            def hook(_module, args, kwargs):
                assert cache is not None
                hidden, rest_args, rest_kwargs = _split_hidden(args, kwargs)
                if index == record_from:
                    cache.hidden = hidden.detach()
                cache.calls.append((rest_args, rest_kwargs))

            return hook

        for i in range(record_from, adapter.num_layers):
            handles.append(adapter.layers[i].register_forward_pre_hook(record(i), with_kwargs=True))
    try:
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out.last_hidden_state, cache


def forward_suffix(adapter: ModelAdapter, cache: SuffixCache) -> torch.Tensor:
    """Final (normed) hidden states from the recorded inputs, running blocks ``start..N-1`` only."""
    hidden = cache.hidden
    for i, (args, kwargs) in enumerate(cache.calls):
        hidden = _block_output(adapter.layers[cache.start + i](hidden, *args, **kwargs))
    return adapter.final_norm(hidden)
