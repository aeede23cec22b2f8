"""Which base model an edit belongs to: its config and the original values of the tensors the edit touches.

An edit is a change relative to particular weights. The manifest records the model's name, its
config (and a hash of it), and shape, dtype and sha256 of every parameter the edit changes or builds
on, taken before the edit. Applying compares them with the target model and names each difference.

Only the parameters the edit touches are hashed, so checking is cheap on any model size. Two edits
of the same tensor made independently from one base therefore do not stack (the second sees a
changed tensor); an edit made on top of another (saved from the model with the first applied) does.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import torch

from overtone.models.adapters import ArchitectureError
from overtone.models.loading import LoadedModel

log = logging.getLogger(__name__)

# Config entries that name or date a checkpoint rather than shape its computation.
_NOT_IDENTITY = {"transformers_version", "dtype", "torch_dtype"}


class EditMismatchError(ValueError):
    """The model is not the one the edit was made on; the message says what differs."""


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes in memory order (any dtype, any device)."""
    data = tensor.detach().contiguous().cpu().view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_record(tensor: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype), "sha256": tensor_sha256(tensor)}


def model_config(lm: LoadedModel) -> dict[str, Any]:
    """The config entries that define the model's computation (transformers' non-default entries)."""
    config = lm.model.config.to_diff_dict()
    return {k: v for k, v in sorted(config.items()) if k not in _NOT_IDENTITY and not k.startswith("_")}


def config_sha256(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def base_identity(lm: LoadedModel, base: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The manifest's ``model`` entry: name, loading identity, config and hashes of the ``base`` tensors."""
    config = model_config(lm)
    return {
        "name": lm.name,
        "identity": lm.identity,
        "model_type": lm.adapter.model_type,
        "dtype": dtype_name(lm.dtype),
        "config_sha256": config_sha256(config),
        "config": config,
        "tensors": {name: tensor_record(value) for name, value in sorted(base.items())},
    }


def differences(lm: LoadedModel, recorded: dict[str, Any]) -> list[str]:
    """What differs between ``lm`` and the base model ``recorded`` in a manifest (empty: it is the same).

    Config entries that only one side writes (another transformers version writes other defaults) are
    logged, not counted; entries both sides have must agree, and every recorded tensor must match.
    """
    problems = []
    config = model_config(lm)
    if config_sha256(config) != recorded["config_sha256"]:
        saved = recorded["config"]
        changed = [f"{k}: {config[k]!r} here, {saved[k]!r} in the edit's base"
                   for k in sorted(config.keys() & saved.keys()) if config[k] != saved[k]]
        problems += [f"config {c}" for c in changed]
        one_sided = sorted(config.keys() ^ saved.keys())
        if one_sided:
            log.info("config entries written on one side only (ignored): %s", ", ".join(one_sided))
    if problems:  # another architecture: its tensors would only repeat the news
        return problems
    for name, expected in recorded["tensors"].items():
        try:
            tensor = lm.adapter.parameter(name)
        except ArchitectureError:
            problems.append(f"{name}: not in this model")
            continue
        got = tensor_record(tensor)
        for key in ("shape", "dtype"):
            if got[key] != expected[key]:
                problems.append(f"{name}: {key} {got[key]} here, {expected[key]} in the edit's base")
                break
        else:
            if got["sha256"] != expected["sha256"]:
                problems.append(f"{name}: values differ from the edit's base (sha256 {got['sha256'][:12]} here, "
                                f"{expected['sha256'][:12]} saved): another model, or another edit changed it")
    return problems
