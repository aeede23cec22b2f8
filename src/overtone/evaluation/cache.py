"""The unedited model's evaluation, computed once: a content-addressed cache shared by every run on a slice.

What the unedited pass yields depends only on the model, the probes, the evaluation settings and the code
that computes them, so the CE and OverTone runs of a pair, every row of an ablation and every seed read it
from ``<cache>/eval/`` (``cachedir.EntryStore``) instead of recomputing it:

* teacher-forced: the argmax predictions at the answer positions of one forward batch (a case's probes, or
  a batch of a parallel edit's rows), keyed by the batch's token ids and masks and the probes' texts;
* wild: the unedited replies (token ids and text) to the probes of one ``before*`` call, keyed by their
  texts and token ids and the wild settings;
* a locality probe's own answer (the unedited model's greedy continuation), keyed by its prompt.

An entry is keyed by what was computed, whole: a row's floating-point result can depend on the other rows of
its batch, so an entry holds one batch (or one call's replies) and is only read for the very same batch, which
keeps records bit-identical with and without the cache. The key also holds the model's identity
(``models.fingerprint.unedited_digest``: config, tokenizer and weights as loaded), the device type, its CPU
capability or GPU name and threads, the torch and transformers versions, ``EVAL_CODE_VERSION`` and the package
version. A model with live edits or an applied artifact is never looked up or stored (a warning says so once).

A hit records nothing for the edited pass to replay (``models.replay``): the edited pass then runs the whole
model, which gives the same logits (replay is bit-identical).
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import transformers

from overtone.cachedir import EntryStore
from overtone.models.fingerprint import unedited_digest
from overtone.models.loading import LoadedModel
from overtone.version import __version__

log = logging.getLogger(__name__)

T = TypeVar("T")

# The version of what the unedited pass computes and how an entry stores it. Bump it with any change that
# alters an unedited result (the scored positions, the argmax, a stop rule, the reply's text or ids, the
# probes' order, a prompt template) or the layout of a value: older entries are then never read again.
EVAL_CODE_VERSION = 1


def _device(lm: LoadedModel) -> dict[str, Any]:
    """What besides the inputs can change floating-point results: the kernels' device and threads."""
    device = lm.device
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device)}
    if device.type == "cpu":
        return {"type": "cpu", "capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
                "threads": torch.get_num_threads()}
    return {"type": device.type}


class EvalCache:
    """The entries of one loaded model: ``key`` builds a key (None while the model is edited), ``read`` and
    ``write`` go to the store.

    Made before the model's first edit (``prepare_run`` makes it right after loading): the model is hashed here,
    once per process, and a model changed in place before that is never taken for the unedited one.
    """

    def __init__(self, lm: LoadedModel, store: EntryStore | None = None) -> None:
        self.lm = lm
        self.store = store or EntryStore()
        self._warned = False
        unedited_digest(lm.model, lm.tokenizer)

    def key(self, kind: str, settings: dict[str, Any], probes: dict[str, Any]) -> dict[str, Any] | None:
        """The key of the unedited result ``kind`` of ``probes`` (texts and token ids) under ``settings``; None
        when the model is not the unedited one it was loaded as (live edits, an applied artifact)."""
        digest = unedited_digest(self.lm.model, self.lm.tokenizer)
        if digest is None:
            if not self._warned:
                log.warning("evaluation cache not used: model %s is not the model as loaded (live edits, an "
                            "applied artifact, or a change made before the cache first saw it: make the EvalCache "
                            "right after loading, as prepare_run does)", self.lm.name)
                self._warned = True
            return None
        return {
            "kind": kind,
            "model": {"name": self.lm.name, "sha256": digest, "dtype": str(self.lm.dtype).removeprefix("torch.")},
            "settings": settings,
            "probes": probes,
            "device": _device(self.lm),
            "versions": {"eval_code": EVAL_CODE_VERSION, "overtone": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__},
        }

    def read(self, key: dict[str, Any], check: Callable[[Any], bool]) -> Any | None:
        """The stored value of ``key`` that ``check`` accepts; None to compute it (also for a damaged entry)."""
        return self.store.read(key, check)

    def write(self, key: dict[str, Any], value: Any) -> None:
        """Store a computed value; a cache that cannot be written is only a slower run (a warning)."""
        try:
            self.store.write(key, value)
        except OSError as exc:
            log.warning("evaluation cache: cannot write under %s (%s)", self.store.root, exc)


def through(cache: EvalCache | None, kind: str, settings: dict[str, Any], probes: Callable[[], dict[str, Any]],
            compute: Callable[[], T], encode: Callable[[T], Any], decode: Callable[[Any], T],
            check: Callable[[Any], bool]) -> tuple[T, bool]:
    """An unedited result and whether it came from ``cache``: read when an entry of ``kind`` for ``probes()`` under
    ``settings`` exists and ``check`` accepts its value (``decode`` rebuilds the result), otherwise computed and,
    when the model is the unedited one, stored (``encode``: the result as JSON data). No cache: computed."""
    key = cache.key(kind, settings, probes()) if cache is not None else None
    if key is None:
        return compute(), False
    assert cache is not None
    stored = cache.read(key, check)
    if stored is not None:
        return decode(stored), True
    result = compute()
    cache.write(key, encode(result))
    return result, False
