"""Training objectives for gradient-based editors: cross-entropy and OverTone (with its ablations)."""

from __future__ import annotations

from overtone.objectives.base import IGNORE_INDEX, Objective, ObjectiveOutput, TokenScores
from overtone.objectives.ce import CrossEntropy
from overtone.objectives.overtone import CLIP_TESTS, CLIP_VALUES, TIES, OverTone, OverToneConfig, top_n_sigma_mask

OBJECTIVES = ("ce", "overtone")
# OverTone's components and the paper's names for the runs without them (Table 4.4, docs/method.md).
ABLATIONS = {"clip": "w/o clip", "dynamic": "w/o dyn-", "mode_check": "w/o chk-", "filter": "w/o flt-"}
# Where the paper's text is silent: named settings whose default is this project's first reading (docs/method.md).
SILENT_CHOICES = ("tie", "clip_value", "clip_test")


def make_objective(name: str, overtone: OverToneConfig | None = None) -> Objective:
    """Build an objective by name; ``overtone`` configures OverTone and is ignored by CE."""
    if name == "ce":
        return CrossEntropy(reduction=overtone.reduction if overtone else "mean")
    if name == "overtone":
        return OverTone(overtone)
    raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")


def objective_label(config: dict[str, object] | None) -> str:
    """The name tables and plots give an objective's resolved config: CE, OverTone, or its ablation.

    OverTone with a component switched off is named after the paper's ablation ("w/o clip", ...), and a
    silent choice other than the default is added ("tie=mix"); hyper-parameters (lam, n, epsilon) do not
    change the label.
    """
    if not config:
        return "-"
    name = str(config.get("name", "-"))
    if name == "ce":
        return "CE"
    if name == "overtone":
        off = [label for key, label in ABLATIONS.items() if config.get(key) is False]
        defaults = OverToneConfig()
        choices = [f"{key}={config[key]}" for key in SILENT_CHOICES
                   if key in config and config[key] != getattr(defaults, key)]
        return ", ".join([*off, *choices]) if off else ", ".join(["OverTone", *choices])
    return name


__all__ = [
    "ABLATIONS",
    "CLIP_TESTS",
    "CLIP_VALUES",
    "IGNORE_INDEX",
    "OBJECTIVES",
    "SILENT_CHOICES",
    "TIES",
    "CrossEntropy",
    "Objective",
    "ObjectiveOutput",
    "OverTone",
    "OverToneConfig",
    "TokenScores",
    "make_objective",
    "objective_label",
    "top_n_sigma_mask",
]
