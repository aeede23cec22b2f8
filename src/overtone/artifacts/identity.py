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
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from overtone.artifacts.manifest import MANIFEST, ArtifactError, refuse
from overtone.models import embedded
from overtone.models.adapters import ArchitectureError
from overtone.models.loading import DEFAULT_MODEL, LoadedModel

log = logging.getLogger(__name__)

# Config entries that name or date a checkpoint rather than shape its computation.
_NOT_IDENTITY = {"transformers_version", "dtype", "torch_dtype"}


# A Hugging Face hub id: "name" or "owner/name" (letters, digits, "-", "_", "."; no "..", no leading dot).
_HUB_ID = re.compile(r"(?!\.)(?!.*\.\.)[\w.-]+(/(?!\.)[\w.-]+)?")


class EditMismatchError(ArtifactError):
    """The model is not the one the edit was made on; the message says what differs."""


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes in memory order (any dtype, any device)."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()  # 0-d too
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
    here, saved_gguf = lm.identity.get("gguf_sha256"), recorded["identity"].get("gguf_sha256")
    if here and saved_gguf and here != saved_gguf:
        problems.append(f"identity gguf_sha256: {here} here, {saved_gguf} in the edit's base")
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
                problems.append(f"{name}: values differ from the edit's base (sha256 {got['sha256']} here, "
                                f"{expected['sha256']} saved): another model, or another edit changed it")
    return problems


@dataclass(frozen=True)
class BaseChoice:
    """The model to load for saved edits (``source``, as ``load_model`` takes it) and why (for the log)."""

    source: str
    reason: str


def choose_base(artifacts: Sequence[Any], model: str | None, trust_manifest: bool) -> BaseChoice:
    """The base model of ``artifacts`` (``EditArtifact``): the user's ``model``, else the embedded model the first
    was made on, else the folder or hub id its manifest names, but only with ``trust_manifest``.

    A manifest's path is used only when it is absolute (nothing is resolved against the current folder); a
    hub id only when it is one (never a path) and no folder here has that name. Refusals name the field and
    say how to choose.
    """
    if model is not None:
        return BaseChoice(model, "given with --model")
    if not artifacts:
        return BaseChoice(DEFAULT_MODEL, "the default model; no edit names one")
    first = artifacts[0]
    recorded = first.manifest["model"]
    identity = recorded["identity"]
    name = identity.get("name", recorded["name"])
    if "gguf_sha256" in identity:
        if name not in embedded.EMBEDDED:
            raise refuse(first.path, MANIFEST, "model.identity.name", f"the embedded model {name!r} is not one this "
                         f"overtone ships ({', '.join(embedded.EMBEDDED)}); give the base model with --model")
        return BaseChoice(name, f"the embedded model {first.path} was made on")
    where = identity.get("path")
    what = f"the local folder {where}" if where is not None else f"the hub model {name!r}, which would be downloaded"
    if not trust_manifest:
        raise refuse(first.path, MANIFEST, "model.identity", f"the edit was made on {what}; give the base model with "
                     "--model (a name, folder or hub id), or accept the manifest's with --trust-manifest-model")
    if where is not None:
        path = Path(where)
        if not path.is_absolute():
            raise refuse(first.path, MANIFEST, "model.identity.path", f"{where!r} is a relative path, which would "
                         "depend on the current folder; give the base model with --model")
        if not path.is_dir():
            raise refuse(first.path, MANIFEST, "model.identity.path", f"{where} is not a folder here; give the base "
                         "model with --model")
        return BaseChoice(where, "the folder the edit's manifest names, accepted with --trust-manifest-model")
    if not _HUB_ID.fullmatch(name):
        raise refuse(first.path, MANIFEST, "model.name", f"{name!r} is not a hub id; give the base model with --model")
    if Path(name).exists():
        raise refuse(first.path, MANIFEST, "model.name", f"{name!r} is a hub id and also a path here; give the base "
                     "model with --model")
    return BaseChoice(name, "the hub model the edit's manifest names, accepted with --trust-manifest-model")
