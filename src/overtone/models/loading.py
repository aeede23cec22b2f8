"""Load a causal LM and its tokenizer, ready for editing: the embedded default, a local folder or a hub id."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from overtone.models import embedded
from overtone.models.adapters import ModelAdapter
from overtone.models.fingerprint import remember_loaded

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


def _source(name: str) -> tuple[str | Path, bool, dict[str, Any]]:
    """Where ``name`` loads from, whether that is local, and what identifies it."""
    if name in embedded.EMBEDDED:
        source, sha = embedded.checkpoint_dir(name)
        return source, True, {"gguf_sha256": sha}
    if Path(name).expanduser().is_dir():
        source = Path(name).expanduser().resolve()
        return source, True, {"path": str(source)}
    return name, False, {}


def _load_error(name: str, source: str | Path, local: bool, exc: Exception) -> ModelLoadError:
    if local:
        return ModelLoadError(f"could not load model {name!r} from {source}: {exc}")
    return ModelLoadError(
        f"could not load model {name!r}: it is not an embedded model ({', '.join(embedded.EMBEDDED)}), "
        f"not a local checkpoint folder, and loading it as a hub id failed: {exc}"
    )


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, name: str) -> PreTrainedTokenizerBase:
    if not tokenizer.is_fast:
        raise ModelLoadError(f"model {name!r} has no fast tokenizer; overtone needs character offsets")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """The tokenizer of model ``name`` alone: enough to check a run's cases in seconds, before loading the model."""
    source, local, _ = _source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise _load_error(name, source, local, exc) from exc
    return _prepare_tokenizer(tokenizer, name)


def load_config(name: str = DEFAULT_MODEL) -> PretrainedConfig:
    """The configuration (``config.json``) of model ``name`` alone, no weights: its layer count for the checks
    made before the model loads."""
    source, local, _ = _source(name)
    try:
        return AutoConfig.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise _load_error(name, source, local, exc) from exc


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "fp32") -> LoadedModel:
    """Load ``name``: an embedded model name, a local checkpoint folder, or a Hugging Face hub id.

    The model is put in eval mode with every parameter frozen; editors unfreeze what they train.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    torch_device = resolve_device(device)
    source, local, extra = _source(name)
    identity: dict[str, Any] = {"name": name, "dtype": dtype, **extra}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], local_files_only=local)
    except (OSError, ValueError) as exc:
        raise _load_error(name, source, local, exc) from exc
    lm = prepare_model(model, tokenizer, name, identity)
    lm.model.to(torch_device)
    remember_loaded(lm.model)  # on its device: the base the evaluation cache checks against
    log.info("loaded %s (%s, %d layers) on %s in %s", name, lm.adapter.model_type, lm.adapter.num_layers,
             torch_device, dtype)
    return lm


def prepare_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, identity: dict[str, Any] | None = None
) -> LoadedModel:
    """Wrap an already built model for editing: eval mode, every parameter frozen, a pad token set; noted as
    loaded (``fingerprint.remember_loaded``)."""
    tokenizer = _prepare_tokenizer(tokenizer, name)
    model.eval()
    model.requires_grad_(False)
    remember_loaded(model)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=ModelAdapter(model), name=name,
                       identity=identity or {"name": name})
