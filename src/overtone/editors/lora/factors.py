"""What LoRA's two forward paths share, so that a case gets the same adapters on either.

peft's adapters (one edit at a time, ``editor``) and the per-case factors (``per_case``) start from
the same values, drawn from the same generator in the same order, are scaled alike and carry the
same AdaLoRA orthogonality term. Randomness: every edit has its own generator, seeded from the
config's seed and the ids of its cases, so it does not depend on torch's global generator.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
from torch import nn

from overtone.benchmarks.cases import EditCase
from overtone.editors.lora.config import LoRAConfig


def edit_generator(cfg: LoRAConfig, cases: Sequence[EditCase], device: torch.device | str) -> torch.Generator:
    """The random generator of an edit of ``cases``, seeded from the config's seed and the case ids."""
    seed = zlib.crc32(f"{cfg.seed}:{','.join(c.case_id for c in cases)}".encode())
    return torch.Generator(device=device).manual_seed(seed)


def initial_factors(cfg: LoRAConfig, features: Sequence[tuple[int, int]], generator: torch.Generator,
                    device: torch.device | str) -> list[dict[str, torch.Tensor]]:
    """Fresh adapter factors for every adapted module ((in, out) ``features``), drawn from ``generator`` in a
    fixed order, as peft's initialisations draw them: LoRA A ~ kaiming-uniform(a=sqrt 5), B = 0; AdaLoRA
    A, B ~ N(0, 0.02), E = 0."""
    out = []
    for n_in, n_out in features:
        if cfg.variant == "adalora":
            a = torch.empty(cfg.init_rank, n_in, device=device).normal_(0.0, 0.02, generator=generator)
            b = torch.empty(n_out, cfg.init_rank, device=device).normal_(0.0, 0.02, generator=generator)
            out.append({"A": a, "B": b, "E": torch.zeros(cfg.init_rank, 1, device=device)})
        else:
            a = torch.empty(cfg.rank_value, n_in, device=device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            out.append({"A": a, "B": torch.zeros(n_out, cfg.rank_value, device=device)})
    return out


def scaling(cfg: LoRAConfig) -> tuple[float, float | None]:
    """peft's scaling of the adapter term: alpha / r (LoRA), or alpha and the divisor rank + 1e-5 (AdaLoRA)."""
    if cfg.variant == "adalora":
        return (cfg.alpha if cfg.alpha > 0 else float(cfg.init_rank)), cfg.init_rank + 1e-5
    return cfg.alpha / cfg.rank_value, None


def orthogonality(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """AdaLoRA's regulariser: mean Frobenius distance of P P^T (A) and Q^T Q (B) from the identity over the
    adapters' (A, B) pairs; per case ([cases]) when the factors carry a leading case dimension."""
    terms = []
    for a, b in pairs:
        for cov in (a @ a.mT, b.mT @ b):
            eye = torch.eye(cov.size(-1), device=cov.device, dtype=cov.dtype)
            terms.append(torch.linalg.matrix_norm(cov - eye))
    return torch.stack(terms).mean(dim=0)
