"""MELO's keys and codebook: which edit's LoRA block, if any, a sequence gets.

A sequence's key is the residual stream entering block ``key_layer`` at its last real token. The
codebook files each edit's key into clusters (new, joined, or split on a conflicting label) and routes
a key to the block of its nearest cluster's nearest key, or to none outside every radius. No peft and
no training here: the editor calls ``add`` while an edit trains and ``route`` on every other pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from overtone.models.loading import LoadedModel
from overtone.models.replay import forward_hidden
from overtone.models.routing import last_token_index, real_tokens
from overtone.tokens import encode_pairs


def row_keys(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """MELO's keys [B, H] (fp32) from a block's inputs: each row's hidden state at its last real token."""
    hidden = args[0] if args else kwargs["hidden_states"]
    batch, length = hidden.shape[:2]
    last = last_token_index(real_tokens(block, args, kwargs), batch, length, hidden.device)
    return hidden[torch.arange(batch, device=hidden.device), last].detach().float()


@torch.no_grad()
def sequence_keys(lm: LoadedModel, key_layer: int, prompts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """The keys MELO computes at ``key_layer`` for ``prompt + " " + answer`` sequences (for measuring radii)."""
    batch = encode_pairs(lm.tokenizer, prompts, answers, lm.device)
    seen: list[torch.Tensor] = []
    hook = lm.adapter.layers[lm.adapter.check_layer(key_layer)].register_forward_pre_hook(
        lambda block, args, kwargs: seen.append(row_keys(block, args, kwargs)), with_kwargs=True)
    try:
        forward_hidden(lm.adapter, batch.input_ids, batch.attention_mask)
    finally:
        hook.remove()
    return seen[0]


@dataclass(frozen=True)
class Cluster:
    """One codebook entry. Immutable, so a snapshot of the codebook is a tuple of references."""

    center: torch.Tensor  # [H]
    radius: float
    label: str
    keys: torch.Tensor  # [P, H]
    blocks: tuple[str | None, ...]  # adapter of each key; None = no LoRA


class Codebook:
    """MELO's vector database: key clusters that map a sequence's key to an edit's LoRA block."""

    def __init__(self, init_radius: float) -> None:
        self.init_radius = init_radius
        self.clusters: tuple[Cluster, ...] = ()

    def nearest(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance [B] to the nearest cluster centre and that cluster's index [B]."""
        centers = torch.stack([c.center for c in self.clusters])
        return torch.cdist(keys, centers, compute_mode="donot_use_mm_for_euclid_dist").min(dim=-1)

    def route(self, keys: torch.Tensor) -> list[str | None]:
        """The block of each key [B, H]: its nearest cluster's nearest key, None outside every radius."""
        if not self.clusters:
            return [None] * keys.shape[0]
        distance, index = self.nearest(keys)
        blocks: list[str | None] = []
        for key, d, i in zip(keys, distance.tolist(), index.tolist(), strict=True):
            cluster = self.clusters[i]
            if d > cluster.radius:
                blocks.append(None)
            else:
                blocks.append(cluster.blocks[int((cluster.keys - key).norm(dim=-1).argmin())])
        return blocks

    def add(self, key: torch.Tensor, label: str, block: str) -> str:
        """File an edit's key; returns what happened: ``new``, ``joined`` or ``split``."""
        key = key.detach()
        fresh = Cluster(center=key, radius=self.init_radius, label=label, keys=key[None], blocks=(block,))
        if not self.clusters:
            self.clusters = (fresh,)
            return "new"
        distance, index = (t.item() for t in self.nearest(key[None]))
        near = self.clusters[index]
        clusters = list(self.clusters)
        if distance > near.radius + self.init_radius:
            clusters.append(fresh)
            outcome = "new"
        elif label == near.label:
            keys = torch.cat([near.keys, key[None]])
            center = keys.mean(dim=0)
            radius = max((keys - center).norm(dim=-1).max().item(), self.init_radius)
            clusters[index] = Cluster(center, radius, near.label, keys, (*near.blocks, block))
            outcome = "joined"
        else:
            radius = distance / 2 - 1e-5
            inside = (near.keys - near.center).norm(dim=-1) <= radius
            if bool(inside.any()):
                kept = Cluster(near.center, radius, near.label, near.keys[inside],
                               tuple(b for b, k in zip(near.blocks, inside.tolist(), strict=True) if k))
            else:
                kept = Cluster(near.center, radius, near.label, near.center[None], (None,))
            clusters[index] = kept
            clusters.append(replace(fresh, radius=distance / 2 + 1e-5))
            outcome = "split"
        self.clusters = tuple(clusters)
        return outcome
