"""Where the parts of a transformer live, per architecture.

Editors speak of *roles* ("the MLP output projection of layer 20"), never of module paths. An
adapter, chosen by ``config.model_type`` (never by the model's name), maps roles to the modules of
one Hugging Face architecture. Adding an architecture is one entry in ``ARCHITECTURES``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ROLES = ("mlp_out", "mlp_in", "mlp_gate", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out")


class ArchitectureError(ValueError):
    """The model's architecture, a role or a layer index is not supported."""


@dataclass(frozen=True)
class Architecture:
    """Module paths of one architecture family, relative to the causal-LM wrapper or to a layer."""

    layers: str  # the ModuleList of decoder blocks
    final_norm: str
    roles: dict[str, str]  # role -> path inside one decoder block
    conv1d: bool = False  # GPT-2 style Conv1D: weight is [in, out] instead of [out, in]


_LLAMA_LIKE = Architecture(
    layers="model.layers",
    final_norm="model.norm",
    roles={
        "mlp_out": "mlp.down_proj",
        "mlp_in": "mlp.up_proj",
        "mlp_gate": "mlp.gate_proj",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_out": "self_attn.o_proj",
    },
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gpt2": Architecture(
        layers="transformer.h",
        final_norm="transformer.ln_f",
        roles={
            "mlp_out": "mlp.c_proj",
            "mlp_in": "mlp.c_fc",
            "attn_qkv": "attn.c_attn",
            "attn_out": "attn.c_proj",
        },
        conv1d=True,
    ),
}


class ModelAdapter:
    """Role-based access to the modules of one loaded causal LM."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.model_type: str = model.config.model_type
        if self.model_type not in ARCHITECTURES:
            raise ArchitectureError(
                f"model type {self.model_type!r} is not supported; supported types: "
                f"{', '.join(sorted(ARCHITECTURES))}. Add an entry to overtone.models.adapters.ARCHITECTURES."
            )
        self.arch = ARCHITECTURES[self.model_type]
        self.layers: nn.ModuleList = model.get_submodule(self.arch.layers)
        self.final_norm: nn.Module = model.get_submodule(self.arch.final_norm)
        self.lm_head: nn.Module = model.get_output_embeddings()
        self.softcap: float | None = getattr(model.config, "final_logit_softcapping", None)
        self._head_key: tuple[int, int] | None = None  # which head weight ``_head`` is a float32 copy of
        self._head: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.num_layers:
            raise ArchitectureError(
                f"layer {layer!r} is out of range for {self.model_type} with {self.num_layers} layers "
                f"(valid: 0..{self.num_layers - 1})"
            )
        return layer

    def module(self, role: str, layer: int) -> nn.Module:
        """The module playing ``role`` in decoder block ``layer``."""
        if role not in self.arch.roles:
            raise ArchitectureError(
                f"role {role!r} does not exist in {self.model_type}; available: {', '.join(self.arch.roles)}"
            )
        return self.layers[self.check_layer(layer)].get_submodule(self.arch.roles[role])

    def weight(self, role: str, layer: int) -> nn.Parameter:
        return self.module(role, layer).weight

    def parameter(self, name: str) -> nn.Parameter:
        """A parameter by its name in the plain model (``model.layers.20.mlp.down_proj.weight``), also
        while peft wraps its module (the name then lives under ``base_layer``)."""
        path, _, attr = name.rpartition(".")
        try:
            module = self.model.get_submodule(path)
        except AttributeError as exc:
            raise ArchitectureError(f"{name}: no such parameter in this {self.model_type} model") from exc
        base = getattr(module, "get_base_layer", None)
        value = getattr(base() if base is not None else module, attr, None)
        if not isinstance(value, nn.Parameter):
            raise ArchitectureError(f"{name}: no such parameter in this {self.model_type} model")
        return value

    def in_features(self, role: str, layer: int) -> int:
        """Width of the role's input, whichever way its weight is stored."""
        weight = self.weight(role, layer)
        return weight.shape[0] if self.arch.conv1d else weight.shape[1]

    def oriented(self, matrix: torch.Tensor) -> torch.Tensor:
        """An [out, in] matrix (the ``nn.Linear`` layout) in the layout of this architecture's weights."""
        return matrix.T if self.arch.conv1d else matrix

    def path(self, role: str, layer: int) -> str:
        """Fully qualified module name, e.g. ``model.layers.20.mlp.down_proj``."""
        self.module(role, layer)
        return f"{self.arch.layers}.{layer}.{self.arch.roles[role]}"

    def logits(self, hidden: torch.Tensor, fp32: bool = False) -> torch.Tensor:
        """Vocabulary logits from final-normed hidden states (applies Gemma's soft-capping).

        ``fp32`` runs the head in float32 whatever the model's dtype. Training objectives ask for it:
        in bf16 the rounding of the head's output moves log p(y) by about 0.01 nats, the size of
        OverTone's clip threshold, so the clip decision would be noise. The float32 copy of the head's
        weight is made once and reused while the weight is unchanged (one vocabulary x hidden matrix).
        """
        if fp32 and self.lm_head.weight.dtype != torch.float32:
            bias = self.lm_head.bias
            logits = F.linear(hidden.float(), self._head_fp32(), None if bias is None else bias.float())
        else:
            logits = self.lm_head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def drop_fp32_head(self) -> None:
        """Free the float32 copy of the head (``logits(fp32=True)`` makes it again when next asked): vocabulary x
        hidden x 4 bytes, 0.5 GiB at Llama-2-7B and 2 GiB at Llama-3-8B."""
        self._head_key, self._head = None, None

    def _head_fp32(self) -> torch.Tensor:
        weight = self.lm_head.weight
        key = (weight.data_ptr(), weight._version)
        if self._head is None or self._head_key != key:
            self._head_key, self._head = key, weight.detach().float()
        return self._head
