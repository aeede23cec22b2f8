"""Second moment C = E[k k^T] of the keys of an MLP output projection, cached on disk.

ROME's rank-one update and MEMIT's least-squares update weigh a new key against the keys the layer
already serves, summarised by the uncentred second moment of the ``mlp_out`` input (``down_proj``'s
input: the gated activation) over ordinary text. Here it is estimated on an offline corpus
(``overtone.corpus``):

* every document but the corpus's held-out ones (``Corpus.held_out``, kept for the perplexity check
  of continual editing) is tokenised as the prompts are, and split into samples of at most
  ``max_tokens``;
* samples are batched by length and run through blocks ``0..max(layers)`` only; every real token's
  key is counted; products are formed in fp32 and summed in fp64; the stored C is fp32;
* one pass serves any number of layers; partial sums are checkpointed, so an interrupted
  computation resumes where it stopped;
* the result is cached as safetensors under ``<cache>/stats/<model>/``, keyed by the model's name,
  the sha256 of every weight the key depends on (the embeddings, the blocks below the layer and
  the layer's own block except its ``mlp_out``), the layer, the corpus, its sha256 and held-out
  count, the sample length and count, and the dtypes. A cache hit reads the file and computes nothing.

A computation says up front that it is not cached and where its result will be cached, and after its
first batch (the longest samples) how long the whole pass is expected to take.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from overtone.cachedir import cache_root
from overtone.corpus import Corpus, load_corpus
from overtone.models.loading import LoadedModel
from overtone.tokens import plan_batches

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (tokens done, tokens in all)
STAT_DTYPE = "float32"  # stored dtype of C (computed with fp64 sums)


@dataclass(frozen=True)
class MomentSpec:
    """Which text the statistics come from; part of the cache key."""

    corpus: str = field(default="wikipedia", metadata={"help": "packaged corpus name or a text file"})
    max_tokens: int = field(default=1024, metadata={"help": "tokens per sample; longer documents are split"})
    samples: int | None = field(default=None, metadata={"help": "use the first N samples (all when None)"})

    def __post_init__(self) -> None:
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {self.max_tokens}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")


@dataclass
class SecondMoment:
    """C for one layer, with how it was made."""

    layer: int
    matrix: torch.Tensor  # [I, I] fp32, on the CPU
    tokens: int
    key: dict[str, Any]
    path: Path
    computed: bool  # False when read from the cache
    seconds: float  # compute time of the pass that made it (over every resumed part; shared by its layers)


class _Stop(Exception):
    """Raised after the highest requested block, so the blocks above it never run."""


# ---------------------------------------------------------------------------------------------- identity


def _param_digest(name: str, tensor: torch.Tensor) -> bytes:
    digest = hashlib.sha256(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.digest()


def key_weights(lm: LoadedModel, layer: int) -> list[str]:
    """Names of the parameters that determine the ``mlp_out`` input of ``layer``."""
    adapter = lm.adapter
    adapter.check_layer(layer)
    blocks = adapter.arch.layers + "."
    own = adapter.path("mlp_out", layer) + "."
    after = [adapter.arch.final_norm + "."] + [n + "." for n, m in lm.model.named_modules() if m is adapter.lm_head]
    names = []
    for name, _ in lm.model.named_parameters():  # a tied head appears once, as the input embedding
        if name.startswith(blocks):
            index = int(name[len(blocks):].split(".", 1)[0])
            if index > layer or name.startswith(own):
                continue
        elif any(name.startswith(a) for a in after):
            continue
        names.append(name)
    return names


def weight_hashes(lm: LoadedModel, layers: Sequence[int]) -> dict[int, str]:
    """sha256 of the key-determining weights of each layer (each parameter is read once)."""
    params = dict(lm.model.named_parameters())
    digests: dict[str, bytes] = {}
    out = {}
    for layer in layers:
        combined = hashlib.sha256()
        for name in key_weights(lm, layer):
            if name not in digests:
                digests[name] = _param_digest(name, params[name])
            combined.update(digests[name])
        out[layer] = combined.hexdigest()
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-80:] or "model"


def stats_dir(lm: LoadedModel) -> Path:
    return cache_root() / "stats" / _slug(str(lm.identity.get("path", lm.name)))


def _key(lm: LoadedModel, layer: int, whash: str, corpus: Corpus, corpus_sha: str, spec: MomentSpec) -> dict[str, Any]:
    return {
        "model": lm.name,
        "model_path": lm.identity.get("path"),
        "model_dtype": str(lm.dtype).removeprefix("torch."),
        "module": lm.adapter.path("mlp_out", layer),
        "layer": layer,
        "weights_sha256": whash,
        "corpus": corpus.name,
        "corpus_sha256": corpus_sha,
        "held_out": corpus.held_out,
        **{k: v for k, v in asdict(spec).items() if k != "corpus"},
        "stat_dtype": STAT_DTYPE,
    }


def _file_name(key: dict[str, Any]) -> str:
    samples = key["samples"] or "all"
    return (f"L{key['layer']}-{_slug(key['corpus'])}-{key['corpus_sha256'][:12]}-h{key['held_out']}"
            f"-t{key['max_tokens']}-n{samples}"
            f"-{key['model_dtype']}-w{key['weights_sha256'][:16]}.safetensors")


# ---------------------------------------------------------------------------------------------- data


def corpus_samples(lm: LoadedModel, corpus: Corpus, spec: MomentSpec) -> list[list[int]]:
    """Token samples of the corpus but its held-out documents, in document order, each at most ``max_tokens``."""
    encoded = lm.tokenizer(corpus.statistics_documents(), verbose=False)["input_ids"]
    samples = [ids[s:s + spec.max_tokens] for ids in encoded for s in range(0, len(ids), spec.max_tokens)]
    samples = [s for s in samples if len(s) >= 2]
    return samples[: spec.samples] if spec.samples is not None else samples


# ---------------------------------------------------------------------------------------------- compute


def log_progress(label: str, every: float = 0.1) -> Progress:
    """A progress callback that logs every ``every`` of the way (for computations started by an editor)."""
    next_mark = [0.0]

    def report(done: int, total: int) -> None:
        if total and done / total >= next_mark[0]:
            log.info("%s: %d of %d tokens (%.0f%%)", label, done, total, 100 * done / total)
            next_mark[0] = done / total + every

    return report


def second_moments(
    lm: LoadedModel,
    layers: Sequence[int],
    spec: MomentSpec | None = None,
    progress: Progress | None = None,
    batch_tokens: int = 4096,
    checkpoint_s: float = 60.0,
) -> dict[int, SecondMoment]:
    """C of the ``mlp_out`` input at each of ``layers``: read from the cache, or computed in one pass and cached."""
    spec = spec or MomentSpec()
    layers = sorted(set(layers))
    if not layers:
        raise ValueError("no layers given")
    corpus = load_corpus(spec.corpus)
    corpus_sha = corpus.sha256()
    hashes = weight_hashes(lm, layers)
    keys = {layer: _key(lm, layer, hashes[layer], corpus, corpus_sha, spec) for layer in layers}
    folder = stats_dir(lm)
    paths = {layer: folder / _file_name(keys[layer]) for layer in layers}
    missing = [layer for layer in layers if not paths[layer].is_file()]
    if missing:
        log.info("second moments of %s at layer(s) %s are not cached: computing them once on the corpus %s; the "
                 "result is cached in %s and later runs read it", lm.name, missing, corpus.name, folder)
        folder.mkdir(parents=True, exist_ok=True)
        job = hashlib.sha256(json.dumps([keys[m] for m in missing], sort_keys=True).encode()).hexdigest()[:16]
        with FileLock(str(folder / f"partial-{job}.lock")):
            still = [layer for layer in missing if not paths[layer].is_file()]  # another process may have finished
            if still:
                _compute(lm, corpus, spec, still, keys, paths, folder / f"partial-{job}.safetensors", progress,
                         batch_tokens, checkpoint_s)
    out = {}
    for layer in layers:
        out[layer] = _read(paths[layer], layer, computed=layer in missing)
        if out[layer].key["weights_sha256"] != hashes[layer]:
            raise RuntimeError(f"{paths[layer]} does not hold the statistics of these weights; delete it")
    return out


def _read(path: Path, layer: int, computed: bool) -> SecondMoment:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    key = json.loads(meta["key"])
    return SecondMoment(layer=layer, matrix=load_file(str(path))["mom2"], tokens=int(meta["tokens"]), key=key,
                        path=path, computed=computed, seconds=float(meta.get("seconds", "nan")))


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _compute(
    lm: LoadedModel,
    corpus: Corpus,
    spec: MomentSpec,
    layers: list[int],
    keys: dict[int, dict[str, Any]],
    paths: dict[int, Path],
    partial: Path,
    progress: Progress | None,
    batch_tokens: int,
    checkpoint_s: float,
) -> None:
    adapter = lm.adapter
    samples = corpus_samples(lm, corpus, spec)
    batches = plan_batches(samples, batch_tokens)
    total = sum(len(s) for s in samples)
    device = lm.device
    width = adapter.in_features("mlp_out", layers[0])
    sums = {layer: torch.zeros(width, width, dtype=torch.float64, device=device) for layer in layers}
    done_batches, tokens, earlier_s = 0, 0, 0.0
    if partial.is_file():
        from safetensors import safe_open

        with safe_open(str(partial), framework="pt") as fh:
            meta = fh.metadata()
        if json.loads(meta["layers"]) == layers and int(meta["batches_total"]) == len(batches):
            stored = load_file(str(partial))
            sums = {layer: stored[f"sum.{layer}"].to(device) for layer in layers}
            done_batches, tokens = int(meta["batches"]), int(meta["tokens"])
            earlier_s = float(meta.get("seconds", 0.0))
            log.info("resuming the statistics from %s: %d of %d tokens done", partial.name, tokens, total)
    log.info("second moments of %s at layers %s on %s: %d samples, %d tokens", lm.name, layers, corpus.name,
             len(samples), total)

    # (sums, batches, tokens) of the whole batches done, replaced in one assignment once a batch has
    # passed every layer: an interruption inside a forward pass leaves no part of its batch in a checkpoint.
    done = (sums, done_batches, tokens)

    def checkpoint() -> None:
        sums_, batches_, tokens_ = done
        meta = {"layers": json.dumps(layers), "batches": str(batches_), "batches_total": str(len(batches)),
                "tokens": str(tokens_), "seconds": f"{earlier_s + time.perf_counter() - start:.1f}"}
        _atomic_save({f"sum.{layer}": sums_[layer] for layer in layers}, meta, partial)

    current_mask: list[torch.Tensor] = []
    batch_sums: dict[int, torch.Tensor] = {}

    def accumulate(layer: int):
        def hook(_module, args, _output):
            keys_ = args[0][current_mask[0]].float()
            batch_sums[layer] = keys_.T @ keys_

        return hook

    def stop(_module, _args, _output):
        raise _Stop

    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    handles = [adapter.module("mlp_out", layer).register_forward_hook(accumulate(layer)) for layer in layers]
    handles.append(adapter.layers[layers[-1]].register_forward_hook(stop))
    start = last_save = time.perf_counter()
    if progress:
        progress(tokens, total)
    try:
        for batch in batches[done_batches:]:
            length = len(samples[batch[0]])
            ids = torch.full((len(batch), length), pad, dtype=torch.long)
            mask = torch.zeros_like(ids, dtype=torch.bool)
            for row, i in enumerate(batch):
                ids[row, : len(samples[i])] = torch.tensor(samples[i])
                mask[row, : len(samples[i])] = True
            current_mask[:] = [mask.to(device)]
            batch_sums.clear()
            with torch.no_grad(), contextlib.suppress(_Stop):
                lm.model.base_model(input_ids=ids.to(device), attention_mask=mask.long().to(device), use_cache=False)
            sums_, batches_, tokens_ = done
            done = ({layer: sums_[layer] + batch_sums[layer].double() for layer in layers}, batches_ + 1,
                    tokens_ + int(mask.sum()))
            if done[1] == done_batches + 1 and done[1] < len(batches):
                rate = (done[2] - tokens) / (time.perf_counter() - start)  # the first batch: the longest samples
                log.info("second moments: expected to take about %s for the %d tokens left (measured on the first "
                         "batch); then cached", _duration((total - done[2]) / rate), total - done[2])
            if progress:
                progress(done[2], total)
            if time.perf_counter() - last_save > checkpoint_s and done[1] < len(batches):
                checkpoint()
                last_save = time.perf_counter()
    except BaseException:
        checkpoint()  # keep the whole batches done; the same call resumes from here
        log.warning("statistics interrupted after %d of %d tokens; partial sums saved in %s", done[2], total,
                    partial)
        raise
    finally:
        for h in handles:
            h.remove()
    sums, _, tokens = done
    seconds = earlier_s + time.perf_counter() - start  # compute time over every resumed part
    for layer in layers:
        matrix = (sums[layer] / tokens).to(torch.float32)
        meta = {"key": json.dumps(keys[layer], sort_keys=True), "tokens": str(tokens), "samples": str(len(samples)),
                "seconds": f"{seconds:.1f}"}
        _atomic_save({"mom2": matrix}, meta, paths[layer])
        log.info("cached the second moment of layer %d in %s (%.0f s)", layer, paths[layer], seconds)
    partial.unlink(missing_ok=True)
