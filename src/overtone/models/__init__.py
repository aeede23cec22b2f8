"""Model loading, per-architecture adapters, and partial forward passes."""

from overtone.models.adapters import ARCHITECTURES, ArchitectureError, ModelAdapter
from overtone.models.loading import DEFAULT_MODEL, LoadedModel, ModelLoadError, load_model, load_tokenizer
from overtone.models.replay import SuffixCache, forward_hidden, forward_suffix

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_MODEL",
    "ArchitectureError",
    "LoadedModel",
    "ModelAdapter",
    "ModelLoadError",
    "SuffixCache",
    "forward_hidden",
    "forward_suffix",
    "load_model",
    "load_tokenizer",
]
