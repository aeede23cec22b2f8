"""Token-level cross-entropy, the objective every host editor uses by default."""

from __future__ import annotations

import torch

from overtone.objectives.base import Objective, TokenScores


class CrossEntropy(Objective):
    """-log p(y_i | c_i) for every target token."""

    name = "ce"

    def token_losses(
        self, logits: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None
    ) -> TokenScores:
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        false = torch.zeros_like(labels, dtype=torch.bool)
        return TokenScores(loss, false, false, torch.zeros_like(labels))
