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

from overtone.objectives import CLIP_TESTS, CLIP_VALUES, TIES, OverToneConfig


@dataclass(frozen=True)
class Variant:
    slug: str  # run directory name
    label: str  # table row
    objective: str  # "ce" or "overtone"
    overtone: OverToneConfig
    settings: tuple[tuple[str, Any], ...] = ()  # editor setting overrides
    match_steps: str | None = None  # slug of the variant whose per-case update counts this one trains for

    @property
    def editor_settings(self) -> dict[str, Any]:
        return dict(self.settings)


def ablation_variants(base: OverToneConfig, stop_grid: Sequence[float] = (), chk_lambda: float = 0.1) -> list[Variant]:
    """The paper's Table 4.4 rows in the host editor's own loop, plus this project's controls.

    * "OverTone, stop when clipped": the token-level early stop carried to the whole edit (stop once
      every target token is clipped), this project's addition; its per-case update counts are what the
      matched-steps CE control (``matched_steps_variants``) trains for.
    * The paper's silent choices, each flipped from ``base``'s: ties in the mode check keep the mixture
      ("tie: mix"), a clipped token's loss counts zero ("clipped = 0": only loss-reading stop rules see it),
      and the clip tests p(label) > 1 - ε instead of the KL ("clip on p(label)").
    * When the mode check cannot act at ``base.lam`` (``OverToneConfig.mode_check_can_act``), OverTone
      and "w/o chk" again at ``chk_lambda``, where it can.
    * CE stopped early at each loss threshold of ``stop_grid`` (judged on the objective's loss).
    """
    variants = [
        Variant("ce", "CE", "ce", base),
        Variant("overtone", "OverTone", "overtone", base),
        Variant("no-clip", "w/o clip", "overtone", replace(base, clip=False)),
        Variant("no-dyn", "w/o dyn", "overtone", replace(base, dynamic=False)),
        Variant("no-chk", "w/o chk", "overtone", replace(base, mode_check=False)),
        Variant("no-flt", "w/o flt", "overtone", replace(base, filter=False)),
        Variant("overtone-clip-stop", "OverTone, stop when clipped", "overtone", base,
                (("stop_when_clipped", True),)),
    ]
    for name, choices, slug, label in (("tie", TIES, "tie", "tie: {}"), ("clip_value", CLIP_VALUES, "clip-value",
                                                                          "clipped loss: {}"),
                                       ("clip_test", CLIP_TESTS, "clip-test", "clip test: {}")):
        other = next(c for c in choices if c != getattr(base, name))
        variants.append(Variant(f"{slug}-{other}", label.format(other), "overtone", replace(base, **{name: other})))
    if not base.mode_check_can_act and replace(base, lam=chk_lambda).mode_check_can_act:
        low = replace(base, lam=chk_lambda)
        variants += [
            Variant(f"overtone-l{chk_lambda:g}", f"OverTone λ={chk_lambda:g}", "overtone", low),
            Variant(f"no-chk-l{chk_lambda:g}", f"w/o chk λ={chk_lambda:g}", "overtone", replace(low, mode_check=False)),
        ]
    variants += [Variant(f"ce-stop-{t:g}", f"CE stop<{t:g}", "ce", base, (("stop_loss", t),)) for t in stop_grid]
    return variants


def stopped_early(records: Sequence[dict[str, Any]]) -> bool:
    return any(r.get("stopped_early") for r in records)


def full_overtone(variant: Variant) -> bool:
    """OverTone with every component on (only such rows get a matched-steps control)."""
    return variant.objective == "overtone" and all(
        getattr(variant.overtone, c) for c in ("clip", "dynamic", "mode_check", "filter"))


def matched_steps_controls(variants: Sequence[Variant]) -> list[Variant]:
    """"CE, steps of <row>" for every full-OverTone variant: the control a study runs once that row is done,
    if it stopped early on some case (``matched_steps_variants``)."""
    return [Variant(f"ce-steps-of-{v.slug}", f"CE, steps of {v.label}", "ce", v.overtone, match_steps=v.slug)
            for v in variants if full_overtone(v)]


def matched_steps_variants(
    variants: Sequence[Variant], records: dict[str, Sequence[dict[str, Any]]]
) -> list[Variant]:
    """"CE, matched steps" for every full-OverTone variant that stopped early on some case.

    The control answers "is it OverTone, or just fewer updates?": CE trained on each case for exactly
    the number of updates the OverTone variant took on it (``records`` by variant slug).
    """
    return [c for c in matched_steps_controls(variants) if stopped_early(records.get(c.match_steps or "", ()))]


def step_budgets(records: Sequence[dict[str, Any]]) -> dict[str, int]:
    """The update count of every case of a run, for a matched-steps run."""
    return {r["case_id"]: int(r["steps"]) for r in records}


def sweep_variants(
    base: OverToneConfig, lams: Sequence[float], n_sigmas: Sequence[float], epsilons: Sequence[float],
    ties: Sequence[str] = (),
) -> list[Variant]:
    """CE plus OverTone at every (lambda, n, epsilon[, tie]) of the grid; ``ties`` empty keeps ``base``'s."""
    variants = [Variant("ce", "CE", "ce", base)]
    for lam, n, eps, tie in product(lams, n_sigmas, epsilons, ties or (base.tie,)):
        cfg = replace(base, lam=lam, n_sigma=n, epsilon=eps, tie=tie)
        slug, label = f"ot-l{lam:g}-n{n:g}-e{eps:g}", f"OverTone λ={lam:g} n={n:g} ε={eps:g}"
        if ties:
            slug, label = f"{slug}-{tie}", f"{label} tie={tie}"
        variants.append(Variant(slug, label, "overtone", cfg))
    return variants
