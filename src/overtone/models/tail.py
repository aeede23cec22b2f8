"""Run only the token positions and layers that a change at one token position can reach.

ROME's and MEMIT's value optimisation adds a vector to the output of one module of block ``L`` at
one token of each row (the subject's last token, column ``p``). Nothing at a column before ``p`` and
nothing below block ``L`` depends on that vector. ``models.replay`` skips the blocks below ``L``;
this module also skips the columns before ``p``, which is most of each sequence when it starts with
a context prefix:

1. the caller aligns its rows so that ``p`` is the same column in every row (left padding, with
   explicit position ids so that a row computes what it computes alone);
2. one no-grad pass over the columns before ``p`` caches their keys and values at every layer;
3. the first call runs the columns from ``p`` on through every block, on a copy of that cache, and
   records the inputs of blocks ``L..N-1`` (as ``models.replay`` does for whole sequences);
4. every later call runs blocks ``L..N-1`` on the columns from ``p`` only, attending to a fresh copy
   of the cached prefix.

The first call runs with gradients if the caller wants them, so it doubles as the first optimisation
step. Forward hooks on modules of blocks ``L..N-1`` fire on every call; hooks registered after the
constructor never see the prefix pass.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

from overtone.models.adapters import ModelAdapter
from overtone.models.per_case import take_rows
from overtone.models.replay import _block_output, _split_hidden

_LIVE_CACHE = object()  # stands for the key/value cache in recorded block arguments


class TailPass:
    """Final hidden states of the columns ``cut..T-1`` of a batch, replaying blocks ``start..N-1`` after the first call.

    ``input_ids``, ``attention_mask`` and ``position_ids`` are [B, T]; ``attention_mask`` marks the real
    tokens (left and right padding allowed). ``cut`` may be 0 (no prefix).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cut: int,
        start: int,
    ) -> None:
        adapter.check_layer(start)
        if not 0 <= cut < input_ids.size(1):
            raise ValueError(f"cut {cut} must lie in [0, {input_ids.size(1)}) for sequences of {input_ids.size(1)}")
        self.adapter = adapter
        self.start = start
        self.cut = cut
        self._inputs = (input_ids, attention_mask, position_ids)
        self._prefix: DynamicCache | None = None
        if cut > 0:
            self._prefix = DynamicCache(config=adapter.model.config)
            with torch.no_grad():
                adapter.model.base_model(input_ids=input_ids[:, :cut], attention_mask=attention_mask[:, :cut],
                                         position_ids=position_ids[:, :cut], cache=self._prefix, use_cache=True)
        self._hidden: torch.Tensor | None = None  # [B, T - cut, H] entering block ``start``
        self._calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def keep(self, rows: Sequence[int]) -> None:
        """Keep ``rows`` only (a parallel edit drops the rows of the cases that stopped): their inputs, their
        cached prefix and their recorded block arguments."""
        batch = self._inputs[0].size(0)
        index = torch.tensor(list(rows), dtype=torch.long, device=self._inputs[0].device)
        self._inputs = tuple(t[index] for t in self._inputs)  # type: ignore[assignment]
        if self._prefix is not None:
            self._prefix.batch_select_indices(index)
        if self._hidden is not None:
            self._hidden = self._hidden[index]
            self._calls = [(take_rows(args, rows, batch), take_rows(kwargs, rows, batch))
                           for args, kwargs in self._calls]

    def _fresh_cache(self) -> DynamicCache | None:
        # The prefix is never mutated: every pass appends to a copy of it.
        return copy.deepcopy(self._prefix) if self._prefix is not None else None

    def __call__(self) -> torch.Tensor:
        """Final (normed) hidden states [B, T - cut, H] of the tail columns."""
        if self._hidden is None:
            return self._record()
        cache = self._fresh_cache()
        hidden = self._hidden
        for i, (args, kwargs) in enumerate(self._calls):
            args = tuple(cache if a is _LIVE_CACHE else a for a in args)
            kwargs = {k: cache if v is _LIVE_CACHE else v for k, v in kwargs.items()}
            hidden = _block_output(self.adapter.layers[self.start + i](hidden, *args, **kwargs))
        return self.adapter.final_norm(hidden)

    def _record(self) -> torch.Tensor:
        input_ids, attention_mask, position_ids = self._inputs
        live = self._fresh_cache()

        def placeholder(value: Any) -> Any:
            return _LIVE_CACHE if live is not None and value is live else value

        def record(index: int):
            def hook(_module, args, kwargs):
                hidden, rest_args, rest_kwargs = _split_hidden(args, kwargs)
                if index == self.start:
                    self._hidden = hidden.detach()
                self._calls.append((tuple(placeholder(a) for a in rest_args),
                                    {k: placeholder(v) for k, v in rest_kwargs.items()}))

            return hook

        handles = [self.adapter.layers[i].register_forward_pre_hook(record(i), with_kwargs=True)
                   for i in range(self.start, self.adapter.num_layers)]
        try:
            out = self.adapter.model.base_model(
                input_ids=input_ids[:, self.cut:], attention_mask=attention_mask,
                position_ids=position_ids[:, self.cut:], cache=live, use_cache=live is not None,
            )
        except BaseException:
            self._hidden = None
            self._calls.clear()
            raise
        finally:
            for h in handles:
                h.remove()
        return out.last_hidden_state
