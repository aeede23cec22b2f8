"""WISE's settings: one frozen dataclass, checked on construction.

Apart from the editor so that the command line and study files can check settings before a model is
loaded. Fields left None come from the model's preset (``editors/presets/wise.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from overtone.benchmarks.irrelevant import DEFAULT_SOURCE
from overtone.editors.base import config_problems, max_length_field
from overtone.editors.training import stop_when_clipped_field


@dataclass(frozen=True)
class WISEConfig:
    """WISE hyper-parameters; unset (None) fields come from the model's preset."""

    preset: str | None = field(default=None, metadata={"help": "a model of editors/presets/wise.yaml"})
    layer: int | None = field(default=None, metadata={"help": "layer whose mlp_out matrix gets the side memory"})
    lr: float | None = field(default=None, metadata={"help": "SGD learning rate"})
    steps: int | None = field(default=None, metadata={"help": "maximum optimisation steps per edit"})
    alpha: float | None = field(default=None, metadata={"help": "margin: irrelevant distance should stay below"})
    beta: float | None = field(default=None, metadata={"help": "margin: edit distance should exceed"})
    gamma: float | None = field(default=None, metadata={"help": "margin: edit minus irrelevant distance"})
    act_ratio: float | None = field(default=None, metadata={"help": "threshold = min edit distance x this"})
    threshold_scale: float = field(
        default=1.0, metadata={"help": "extra factor on every threshold (the paper used 0.6 with OverTone)"})
    mask_ratio: float = field(default=0.2, metadata={"help": "fraction of W' each shard may change"})
    norm_constraint: float = field(default=1.0, metadata={"help": "element-wise clamp of W' around W"})
    weight_decay: float = field(default=1e-5, metadata={"help": "SGD weight decay"})
    stop_loss: float = field(
        default=0.02, metadata={"help": "stop once objective + margin loss is below this and changed by <= 1e-4 "
                                        "(the reference's rule)"})
    stop_when_clipped: bool = stop_when_clipped_field()
    save_freq: int = field(default=500, metadata={"help": "edits per shard"})
    merge_freq: int = field(default=1000, metadata={"help": "edits between TIES merges (a multiple of save_freq)"})
    density: float = field(default=0.53, metadata={"help": "TIES: fraction of each shard's delta kept"})
    irrelevant: str = field(
        default=DEFAULT_SOURCE, metadata={"help": "dataset (name or file) whose locality probes are the irrelevant "
                                                  "sentences (default: ZsRE train, MEND format)"})
    seed: int = field(default=0, metadata={"help": "seed of the gradient masks"})
    max_length: int | None = max_length_field()

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.mask_ratio <= 1:
            problems.append(f"mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if not 0 < self.density <= 1:
            problems.append(f"density must be in (0, 1], got {self.density}")
        if self.save_freq < 1 or self.merge_freq < 1 or self.merge_freq % self.save_freq:
            problems.append(f"merge_freq ({self.merge_freq}) must be a positive multiple of save_freq "
                            f"({self.save_freq})")
        if self.norm_constraint <= 0 or self.threshold_scale <= 0:
            problems.append("norm_constraint and threshold_scale must be > 0")
        config_problems("WISE", problems, self.steps, self.lr)
