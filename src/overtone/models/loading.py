"""Load a causal LM and its tokenizer, ready for editing: the embedded default, a local folder or a hub id."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from overtone.models import embedded
from overtone.models.adapters import ModelAdapter

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_MODEL = "smollm2-135m"


class ModelLoadError(RuntimeError):
    """The model named by the user could not be found or loaded."""


@dataclass
class LoadedModel:
    """A model, its tokenizer and its architecture adapter; what every editor and evaluator receives."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: ModelAdapter
    name: str
    identity: dict[str, Any] = field(default_factory=dict)  # written into run configs

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from exc


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "fp32") -> LoadedModel:
    """Load ``name``: an embedded model name, a local checkpoint folder, or a Hugging Face hub id.

    The model is put in eval mode with every parameter frozen; editors unfreeze what they train.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    torch_device = resolve_device(device)
    identity: dict[str, Any] = {"name": name, "dtype": dtype}
    if name in embedded.EMBEDDED:
        source, sha = embedded.checkpoint_dir(name)
        identity["gguf_sha256"] = sha
        local = True
    elif Path(name).expanduser().is_dir():
        source = Path(name).expanduser().resolve()
        identity["path"] = str(source)
        local = True
    else:
        source, local = name, False
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], local_files_only=local)
    except (OSError, ValueError) as exc:
        if local:
            raise ModelLoadError(f"could not load model {name!r} from {source}: {exc}") from exc
        raise ModelLoadError(
            f"could not load model {name!r}: it is not an embedded model ({', '.join(embedded.EMBEDDED)}), "
            f"not a local checkpoint folder, and loading it as a hub id failed: {exc}"
        ) from exc
    lm = prepare_model(model, tokenizer, name, identity)
    lm.model.to(torch_device)
    log.info("loaded %s (%s, %d layers) on %s in %s", name, lm.adapter.model_type, lm.adapter.num_layers,
             torch_device, dtype)
    return lm


def prepare_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, identity: dict[str, Any] | None = None
) -> LoadedModel:
    """Wrap an already built model for editing: eval mode, every parameter frozen, a pad token set."""
    if not tokenizer.is_fast:
        raise ModelLoadError(f"model {name!r} has no fast tokenizer; overtone needs character offsets")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=ModelAdapter(model), name=name,
                       identity=identity or {"name": name})
