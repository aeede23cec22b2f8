"""Which tokens of each row are real, seen from inside a decoder block.

Memory-based editors (WISE, MELO) route each sequence of a batch on its own: WISE averages an
activation distance over the row's tokens, MELO takes the row's last token as its key. Their hooks
sit inside the model, where the token ids and the 2-D attention mask are gone, and during suffix
replay (``models.replay``) the model's top-level forward never runs at all. What every block does
receive, in a full pass and in a replay alike, is the attention mask the model built for it. In a
right-padded batch a token is real exactly when it may attend to itself, so the diagonal of the
4-D mask marks the real tokens; this holds for sliding-window layers too, which only drop far keys.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from overtone.models.adapters import ArchitectureError


def _bound_mask(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The ``attention_mask`` argument of a block call, whether passed by keyword or by position (GPT-2)."""
    if "attention_mask" in kwargs:
        return kwargs["attention_mask"]
    try:
        bound = inspect.signature(block.forward).bind_partial(*args, **kwargs)
    except TypeError:
        return None
    return bound.arguments.get("attention_mask")


def real_tokens(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """Bool [B, T] of the real (non-padding) tokens of a block call, or None when every token is real.

    ``args``/``kwargs`` are what a forward pre-hook registered ``with_kwargs=True`` receives; args[0]
    (or kwargs["hidden_states"]) is the block's hidden state.
    """
    hidden = args[0] if args else kwargs["hidden_states"]
    mask = _bound_mask(block, args, kwargs)
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ArchitectureError(
            f"cannot route per sequence with an attention mask of type {type(mask).__name__}; "
            "load the model with attn_implementation 'sdpa' or 'eager'"
        )
    if mask.dim() == 2:  # flash-attention style: the padding mask itself
        return mask.bool()
    if mask.dim() != 4:
        raise ArchitectureError(f"unexpected attention mask of shape {tuple(mask.shape)} in a decoder block")
    length = hidden.shape[1]
    diagonal = torch.diagonal(mask[:, 0, -length:, -length:], dim1=-2, dim2=-1)
    # bool masks mark allowed pairs with True; additive float masks with 0 (and masked ones with a large negative)
    return diagonal if diagonal.dtype == torch.bool else diagonal == 0


def last_token_index(real: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Index [B] of each row's last real token."""
    positions = torch.arange(length, device=device).expand(batch, length)
    if real is None:
        return positions[:, -1]
    return torch.where(real, positions, -1).amax(dim=-1)
