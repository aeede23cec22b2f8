"""Named variants of one editor run on the same cases: the ablation study and the tuning sweep.

A variant fixes the objective (CE or OverTone with some switches) and optionally overrides editor
settings (the CE early-stop controls). Every variant of a study edits exactly the same cases, so the
per-case paired differences to CE are meaningful.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import product
from typing import Any

from overtone.objectives import OverToneConfig


@dataclass(frozen=True)
class Variant:
    slug: str  # run directory name
    label: str  # table row
    objective: str  # "ce" or "overtone"
    overtone: OverToneConfig
    settings: tuple[tuple[str, Any], ...] = ()  # editor setting overrides

    @property
    def editor_settings(self) -> dict[str, Any]:
        return dict(self.settings)


def ablation_variants(base: OverToneConfig, stop_grid: Sequence[float] = (0.01, 0.03, 0.1)) -> list[Variant]:
    """The paper's Table 4.4 rows plus CE stopped early at each loss threshold of ``stop_grid``.

    The CE rows with a looser early stop are the control the paper lacks: if OverTone's gain comes
    from stopping earlier, CE stopped as early should match it at equal cost.
    """
    variants = [
        Variant("ce", "CE", "ce", base),
        Variant("overtone", "OverTone", "overtone", base),
        Variant("no-clip", "w/o clip", "overtone", replace(base, clip=False)),
        Variant("no-dyn", "w/o dyn", "overtone", replace(base, dynamic=False)),
        Variant("no-chk", "w/o chk", "overtone", replace(base, mode_check=False)),
        Variant("no-flt", "w/o flt", "overtone", replace(base, filter=False)),
    ]
    variants += [Variant(f"ce-stop-{t:g}", f"CE stop<{t:g}", "ce", base, (("stop_loss", t),)) for t in stop_grid]
    return variants


def sweep_variants(
    base: OverToneConfig, lams: Sequence[float], n_sigmas: Sequence[float], epsilons: Sequence[float]
) -> list[Variant]:
    """CE plus OverTone at every (lambda, n, epsilon) of the grid."""
    variants = [Variant("ce", "CE", "ce", base)]
    for lam, n, eps in product(lams, n_sigmas, epsilons):
        cfg = replace(base, lam=lam, n_sigma=n, epsilon=eps)
        variants.append(Variant(f"ot-l{lam:g}-n{n:g}-e{eps:g}", f"OverTone λ={lam:g} n={n:g} ε={eps:g}",
                                "overtone", cfg))
    return variants
