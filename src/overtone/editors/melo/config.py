"""MELO's settings: one frozen dataclass, checked on construction.

Apart from the editor so that the command line and study files can check settings before a model is
loaded. Fields left None come from the model's preset, then from the reference values
(``editors/presets/melo.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from overtone.editors.base import config_problems, max_length_field
from overtone.editors.training import stop_when_clipped_field


@dataclass(frozen=True)
class MELOConfig:
    """MELO hyper-parameters; unset (None) fields come from the model's preset."""

    preset: str | None = field(default=None, metadata={"help": "a model of editors/presets/melo.yaml"})
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "layers that get LoRA blocks"})
    roles: tuple[str, ...] = field(default=("mlp_in",), metadata={"help": "module roles that get LoRA blocks"})
    key_layer: int | None = field(
        default=None, metadata={"help": "keys = residual stream entering this block (default: lowest LoRA layer)"})
    init_radius: float | None = field(default=None, metadata={"help": "radius of a new cluster (key units)"})
    rank: int | None = field(default=None, metadata={"help": "LoRA rank of one edit's block"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (output scale = alpha / rank)"})
    lr: float | None = field(default=None, metadata={"help": "Adam learning rate"})
    steps: int | None = field(default=None, metadata={"help": "optimisation steps per edit"})
    lr_step: int = field(default=20, metadata={"help": "decay the learning rate every this many steps"})
    lr_gamma: float = field(default=0.5, metadata={"help": "learning-rate decay factor"})
    stop_loss: float = field(default=0.0, metadata={"help": "stop once the objective's loss is below (0: never)"})
    stop_when_clipped: bool = stop_when_clipped_field()
    seed: int = field(default=0, metadata={"help": "seed of the LoRA initialisation"})
    max_length: int | None = max_length_field()

    def __post_init__(self) -> None:
        problems = []
        if self.rank is not None and self.rank < 1:
            problems.append(f"rank must be >= 1, got {self.rank}")
        if self.init_radius is not None and self.init_radius <= 0:
            problems.append(f"init_radius must be > 0, got {self.init_radius}")
        if self.layers is not None and not self.layers:
            problems.append("layers must name at least one layer")
        if not self.roles:
            problems.append("roles must name at least one module role")
        config_problems("MELO", problems, self.steps, self.lr)
