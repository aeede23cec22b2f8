"""The identity of a model as it was loaded, and whether it still is: what keys the evaluation cache.

``remember_loaded(model)`` (called where a model is loaded) notes every parameter and buffer's storage and
version counter (bumped by every in-place change) and the number of hooks. ``unedited_digest`` is then
the sha256 of the model's config, tokenizer and every parameter and buffer, computed once per process, and
None as soon as the model differs from the loaded one: a live edit, an applied artifact (changed values, a
peft wrapper's new parameters, a routing hook). A tensor changed and reverted bit for bit (every run reverts
its edits) is hashed again alone and counts as unedited when its bytes are the loaded ones.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

State = tuple[int, int]  # a tensor's storage address and version counter


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **{f"buffer:{n}": b for n, b in model.named_buffers()}}


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _state(tensor: torch.Tensor) -> State:
    return tensor.data_ptr(), tensor._version


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """sha256 of a named tensor's dtype, shape and bytes."""
    digest = hashlib.sha256(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy of the bytes
    return digest.hexdigest()


@dataclass
class _Loaded:
    states: dict[str, State]  # per tensor, as loaded; then as last found equal to the loaded bytes
    hooks: int
    digests: dict[str, str] = field(default_factory=dict)  # per tensor, of the loaded bytes (hashed on first use)
    digest: str | None = None


_LOADED: weakref.WeakKeyDictionary[nn.Module, _Loaded] = weakref.WeakKeyDictionary()


def remember_loaded(model: nn.Module) -> None:
    """Note ``model`` as loaded: the base that ``unedited_digest`` compares with."""
    _LOADED[model] = _Loaded({n: _state(t) for n, t in _tensors(model).items()}, _hooks(model))


def _tokenizer_digest(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{text}|{tokenizer.chat_template}|{tokenizer.pad_token_id}".encode()).hexdigest()


def unedited_digest(model: nn.Module, tokenizer: Any) -> str | None:
    """sha256 of ``model`` as loaded (config, ``tokenizer``, every parameter and buffer), or None when it is not
    the loaded one any more (or was never noted by ``remember_loaded``). Hashes every tensor once per process;
    later calls re-hash only tensors changed in place since."""
    loaded = _LOADED.get(model)
    if loaded is None:
        return None
    tensors = _tensors(model)
    if tensors.keys() != loaded.states.keys() or _hooks(model) != loaded.hooks:
        return None
    if loaded.digest is None:
        if any(_state(t) != loaded.states[n] for n, t in tensors.items()):
            return None  # changed before its first use: not the loaded model
        loaded.digests = {n: tensor_digest(n, t) for n, t in tensors.items()}
        whole = hashlib.sha256(f"{model.config.to_json_string()}|{_tokenizer_digest(tokenizer)}|".encode())
        for name in sorted(loaded.digests):
            whole.update(f"{name}={loaded.digests[name]};".encode())
        loaded.digest = whole.hexdigest()
        return loaded.digest
    for name, tensor in tensors.items():
        if _state(tensor) != loaded.states[name]:
            if tensor_digest(name, tensor) != loaded.digests[name]:
                return None
            loaded.states[name] = _state(tensor)
    return loaded.digest
