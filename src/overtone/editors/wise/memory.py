"""WISE's side memory: its shards, the output of a side copy of the matrix and its activation distance.

Pure tensor code, apart from the editor's hooks and training loop, so that the pieces the routing
and the margin loss are built from can be read and tested alone:

* a ``Shard`` is one side copy W' of the ``mlp_out`` matrix with its routing threshold and mask;
* ``project`` is the module's output with W' in place of W;
* ``distance`` is ``d(x) = mean_t ‖act(W'a_t) − act(W a_t)‖₂`` over a row's real tokens;
* ``ties_merge`` merges closed shards into one memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from overtone.models.adapters import ArchitectureError


@dataclass(frozen=True)
class Shard:
    """One side memory. Immutable: an edit replaces the open shard by a new one, so snapshots stay valid."""

    weight: torch.Tensor  # fp32, the layout of the module's own weight
    min_act: float = math.inf  # smallest edit distance seen; the routing threshold before scaling
    edits: int = 0
    closed: bool = False
    mask: torch.Tensor | None = None  # gradient mask while the shard is open


@dataclass(frozen=True)
class State:
    """Everything an edit changes: an undo snapshot of the editor is one of these."""

    shards: tuple[Shard, ...] = ()
    opened: int = 0  # shards opened so far: indexes the mask's seed
    unmerged: int = 0  # shards closed since the last merge


def ties_merge(base: torch.Tensor, weights: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """TIES merging (Yadav et al. 2023) of ``weights`` around ``base``: trim, elect sign, disjoint mean."""
    deltas = torch.stack([w - base for w in weights])
    keep = max(1, int(density * base.numel()))
    flat = deltas.flatten(1)
    cutoff = flat.abs().topk(keep, dim=1).values[:, -1:]
    trimmed = torch.where(flat.abs() >= cutoff, flat, torch.zeros_like(flat)).view_as(deltas)
    sign = torch.where(trimmed.sum(dim=0) >= 0, 1.0, -1.0)
    agree = trimmed.sign() == sign
    count = agree.sum(dim=0).clamp_min(1)
    return base + (trimmed * agree).sum(dim=0) / count


def activation(config: Any) -> nn.Module:
    """The model's FFN activation function, named by its config."""
    for name in ("hidden_act", "hidden_activation", "activation_function"):
        value = getattr(config, name, None)
        if isinstance(value, str) and value in ACT2FN:
            return ACT2FN[value]
    raise ArchitectureError(f"WISE: cannot find the activation function in the {config.model_type} config")


def project(inner: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv1d: bool) -> torch.Tensor:
    """The module's output with ``weight`` in place of its own, computed in the weight's precision
    (``conv1d``: GPT-2's transposed layout)."""
    inner = inner.to(weight.dtype)
    bias = None if bias is None else bias.to(weight.dtype)
    if conv1d:
        out = inner @ weight
        return out if bias is None else out + bias
    return F.linear(inner, weight, bias)


def distance(act: nn.Module, side: torch.Tensor, original: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """Per-row activation distance [B], averaged over the real tokens (all when ``real`` is None)."""
    token = (act(side.float()) - act(original.float())).norm(dim=-1)
    if real is None:
        return token.mean(dim=-1)
    real = real.to(token.dtype)
    return (token * real).sum(dim=-1) / real.sum(dim=-1).clamp_min(1)
