"""Greedy decoding for the wild protocol at the cost of a few forward passes.

transformers' ``generate`` keeps every row of a batch to its last step: a reply that ends after three
tokens is padded while the longest one runs to the token limit, and a stopping criterion decodes every
row's whole reply at every step. The wild protocol only needs greedy replies that stop early, so this
decoder does the same computation with less work:

* prefill: the prompts are left-padded exactly as ``generate`` pads them (the same columns, positions
  and mask). The longest token prefix that every prompt shares (the chat template's system prompt and
  the QA instruction in the ``qa`` context) is run once per model state and its keys and values are
  copied into each row's columns; only the rest of the prompts is prefilled. With per-case edits a
  model state is a case: the prefix runs once per case under that case's edit (``owners``, ``scope``);
* decode: one token per live row per step with the model's key/value cache (``DynamicCache``); a row
  leaves the batch as soon as its reply is complete (end of sequence, the token limit, or ``done``), and
  the cache, mask and positions shrink with it (``batch_select_indices``). Per-case edits are entered
  again for the rows left, so each row keeps seeing its own case's edit;
* the stop rule reads each row's text as it grows (tokenizers' ``DecodeStream``: one token per step),
  not every row's whole reply.

The prefix is shared only while no forward hook sits in the model: a hook (WISE's and MELO's routing)
may look at all the tokens of a call, which one call over the whole prompt and two over its parts do
not show alike. Replies are token for token those of greedy ``generate`` on the same batch (tests/
test_decoding.py: every tiny architecture, the real model on ZsRE probes, with and without per-case
edits); the two differ only in the shape of some matrix products, as ``generate`` itself does between
batch compositions.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from tokenizers.decoders import DecodeStream
from transformers import DynamicCache, GenerationConfig

from overtone.models.loading import LoadedModel

Scope = Callable[[tuple[int, ...]], AbstractContextManager[Any]]

# Generation-config fields that change which token greedy ``generate`` picks; this decoder applies none.
GREEDY_CHANGES = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
                  "min_length", "min_new_tokens", "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens",
                  "begin_suppress_tokens", "sequence_bias", "exponential_decay_length_penalty", "guidance_scale",
                  "watermarking_config")


def check_greedy(lm: LoadedModel) -> None:
    """Refuse a model whose generation config changes greedy choices (a ``ValueError`` naming the settings)."""
    config, default = lm.model.generation_config, GenerationConfig()
    changed = [f"{name}={getattr(config, name)!r}" for name in GREEDY_CHANGES
               if getattr(config, name, None) != getattr(default, name, None)]
    if changed:
        raise ValueError(f"the model's generation config sets {', '.join(changed)}, which the fast decoder does not "
                         "apply; use the wild decoder 'generate'")


def eos_ids(lm: LoadedModel) -> set[int]:
    """The token ids that end a generation (the generation config's, else the tokenizer's)."""
    configured = lm.model.generation_config.eos_token_id
    if configured is None:
        configured = lm.tokenizer.eos_token_id
    return set(configured if isinstance(configured, list) else [configured]) - {None}


class _Text:
    """A reply's text as its tokens arrive: ``tokenizer.decode`` of the reply so far, each token decoded once.

    ``DecodeStream`` (the fast tokenizer's own streaming decoder) holds a token back while it ends inside
    a character; ``decode`` shows such an end as "\ufffd", and after a space it can complete a stop (". \ufffd"),
    so that step decodes the whole reply. Tokenizers without a stream, or with the Python-side clean-up of
    spaces (not in the stream), decode the whole reply at every step.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.text, self.ids = tokenizer, "", []
        streaming = getattr(tokenizer, "is_fast", False) and not getattr(tokenizer, "clean_up_tokenization_spaces",
                                                                         False)
        self.stream = DecodeStream(skip_special_tokens=True) if streaming else None

    def add(self, token: int) -> str:
        self.ids.append(token)
        chunk = self.stream.step(self.tokenizer.backend_tokenizer, token) if self.stream else None
        if chunk is None:
            return self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.text += chunk
        return self.text


def _hooked(model: torch.nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def shared_prefix(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many leading tokens every left-padded row shares, leaving each row at least one token of its own."""
    lengths = mask.sum(1)
    shortest = int(lengths.min())
    start = (ids.size(1) - lengths)[:, None] + torch.arange(shortest - 1, device=ids.device)
    heads = ids.gather(1, start)
    same = (heads == heads[:1]).all(0).long().cumprod(0)
    return int(same.sum())


def _prefix_cache(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, owners: tuple[int, ...], scope: Scope,
                  length: int) -> DynamicCache:
    """The cache of the first ``length`` columns of every row: the shared prefix run once per owner, its keys and
    values right-aligned in each row's columns (a row padded by p holds the prefix's first length - p tokens)."""
    states = sorted(set(owners))
    longest = int(mask.sum(1).argmax())
    tokens = ids[longest, ids.size(1) - int(mask[longest].sum()):][:length]
    prefix = DynamicCache()  # full layers: every column kept, sliding-window layers included
    with scope(tuple(states)):
        lm.model(input_ids=tokens.expand(len(states), -1), cache=prefix, use_cache=True,
                 position_ids=torch.arange(length, device=ids.device)[None].expand(len(states), -1),
                 **_logits_to_keep(lm.model, length))
    pad = ids.size(1) - mask.sum(1)
    source = (torch.arange(length, device=ids.device)[None] - pad[:, None]).clamp(min=0)  # [rows, length]
    state = torch.tensor([states.index(o) for o in owners], device=ids.device)[:, None]
    cache = DynamicCache(config=lm.model.config)
    for i, layer in enumerate(prefix.layers):
        if layer.keys is None or layer.keys.numel() == 0:
            continue
        # [states, heads, length, dim] -> [rows, length, heads, dim] -> [rows, heads, length, dim]
        keys, values = (t[state, :, source].transpose(1, 2) for t in (layer.keys, layer.values))
        cache.update(keys.contiguous(), values.contiguous(), i)
    return cache


def _logits_to_keep(model: torch.nn.Module, length: int) -> dict[str, Any]:
    """Logits of the last of ``length`` positions only, as ``generate`` asks for them.

    ``logits_to_keep=1`` hands the head a strided view of the last position. For a half-precision model on
    the CPU, torch's matmul then runs one product per row against its own copy of the head
    (pytorch/pytorch#151934): at Llama-2-7B's 32,000 x 4,096 head, 250 MB and about 1.7 s per row of a
    prefill. There the position is kept by index, a contiguous copy, and the head is one matrix product.
    Elsewhere the view is kept: the same kernels as before, so the same replies.
    """
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return {}
    if length == 1 or model.device.type != "cpu" or model.dtype == torch.float32:
        return {"logits_to_keep": 1}
    return {"logits_to_keep": torch.tensor([length - 1], device=model.device)}


@torch.no_grad()
def greedy_ids(lm: LoadedModel, texts: Sequence[str], max_new_tokens: int, add_special_tokens: bool = True,
               done: Callable[[str], bool] | None = None, owners: Sequence[int] | None = None,
               scope: Scope | None = None, share_prefix: bool = True) -> list[list[int]]:
    """The greedy reply ids of each text, ending with the token that completed it (end of sequence, the
    ``max_new_tokens``-th token, or the one after which ``done(reply text)`` holds).

    ``owners``/``scope``: row r is answered by model state ``owners[r]``; ``scope(owners of a batch's rows)``
    is the context in which a forward pass gives each row its state (per-case edits). None: one model.
    """
    if not texts:
        return []
    model, tokenizer = lm.model, lm.tokenizer
    enc = tokenizer(list(texts), padding=True, padding_side="left", return_tensors="pt",
                    add_special_tokens=add_special_tokens).to(lm.device)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    rows = ids.size(0)
    owners = tuple(owners) if owners is not None else (0,) * rows
    scope = scope or (lambda _: contextlib.nullcontext())
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    padded = not bool(mask.all())
    cached = shared_prefix(ids, mask) if share_prefix and rows > len(set(owners)) and not _hooked(model) else 0
    cache = (_prefix_cache(lm, ids, mask, owners, scope, cached) if cached
             else DynamicCache(config=model.config))
    eos = eos_ids(lm)
    live = list(range(rows))  # the row of each batch position
    replies: list[list[int]] = [[] for _ in range(rows)]
    texts_so_far = [_Text(tokenizer) for _ in range(rows)] if done else []
    step_keep = _logits_to_keep(model, 1)  # a decoding step's one position, looked up once
    with scope(owners):
        out = model(input_ids=ids[:, cached:], attention_mask=mask if padded else None,
                    position_ids=positions[:, cached:], cache=cache, use_cache=True,
                    **_logits_to_keep(model, ids.size(1) - cached))
    last = positions[:, -1:]
    while True:
        tokens = out.logits[:, -1].float().argmax(-1)
        stay = []
        for b, (row, token) in enumerate(zip(live, tokens.tolist(), strict=True)):
            replies[row].append(token)
            finished = token in eos or len(replies[row]) >= max_new_tokens or (
                done is not None and done(texts_so_far[row].add(token)))
            if not finished:
                stay.append(b)
        if not stay:
            return replies
        if len(stay) < len(live):
            index = torch.tensor(stay, device=ids.device)
            cache.batch_select_indices(index)
            tokens, mask, last = tokens[index], mask[index], last[index]
            live = [live[b] for b in stay]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        last = last + 1
        with scope(tuple(owners[r] for r in live)):
            out = model(input_ids=tokens[:, None], attention_mask=mask if padded else None, position_ids=last,
                        cache=cache, use_cache=True, **step_keep)
