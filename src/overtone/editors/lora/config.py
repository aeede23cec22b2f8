"""LoRA's settings: one frozen dataclass, checked on construction.

Apart from the editor so that the command line and study files can check settings before a model is
loaded, and so that both forward paths (peft's and the per-case one) read the same definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from overtone.editors.base import config_problems, max_length_field
from overtone.editors.training import stop_when_clipped_field


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyper-parameters; defaults are the reference toolkit's for Llama-2-7B / Llama-3-8B."""

    # The reference toolkit's LoRA config selects AdaLoRA (init rank 12), and the paper used its defaults.
    variant: Literal["lora", "adalora"] = field(default="adalora", metadata={"help": "adalora or lora"})
    rank: int | None = field(
        default=None, metadata={"help": "LoRA rank (default 8); AdaLoRA: target rank of rank_allocation"})
    init_rank: int = field(default=12, metadata={"help": "AdaLoRA: initial rank"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA scaling numerator (scale = alpha / rank)"})
    dropout: float = field(default=0.1, metadata={"help": "adapter dropout while training"})
    target_roles: tuple[str, ...] | None = field(
        default=None, metadata={"help": "adapted roles (default attn_q, attn_v; attn_qkv for GPT-2)"}
    )
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "adapted layers (default: all)"})
    lr: float = field(default=5e-3, metadata={"help": "Adam learning rate"})
    steps: int = field(default=70, metadata={"help": "maximum optimisation steps"})
    stop_loss: float = field(default=0.0, metadata={"help": "stop when the objective's loss is below (0: never)"})
    stop_when_clipped: bool = stop_when_clipped_field()
    weight_decay: float = 0.0
    orth_reg_weight: float = field(default=0.5, metadata={"help": "AdaLoRA orthogonality regulariser weight"})
    rank_allocation: bool = field(
        default=False, metadata={"help": "AdaLoRA: run peft's rank allocation after each step (reference: never)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of adapter init and dropout (mixed with the case ids)"})
    max_length: int | None = max_length_field()

    def __post_init__(self) -> None:
        if self.variant not in ("lora", "adalora"):
            raise ValueError(f"LoRA variant must be 'lora' or 'adalora', got {self.variant!r}")
        if self.variant == "adalora" and self.rank is not None and not self.rank_allocation:
            raise ValueError(
                f"LoRA: rank={self.rank} has no effect on AdaLoRA without rank allocation (its adapters keep "
                "init_rank); set init_rank, or rank_allocation=true to allocate down to rank, or variant=lora"
            )
        problems = [f"rank must be >= 1, got {self.rank_value}"] if self.rank_value < 1 else []
        problems += [f"init_rank must be >= 1, got {self.init_rank}"] if self.init_rank < 1 else []
        config_problems("LoRA", problems, self.steps, self.lr)

    @property
    def rank_value(self) -> int:
        """The LoRA rank, or AdaLoRA's target rank: 8 unless set."""
        return 8 if self.rank is None else self.rank
