"""Keys and values at the subject's last token: what ROME and MEMIT read and what they optimise.

``lookup_activations`` reads a module's input or output at the lookup token of each row, running
only the blocks up to the last one it needs.

``optimise_value`` finds the vector v* that a module should output at the subject's last token so
that the model predicts the new target (ROME's and MEMIT's "value"): a change ``delta`` is added to
the module's output at that token in the bare prompt, in every context-prefixed copy of it, and in
the KL prompt, and optimised with Adam. The target term is an ``Objective`` (cross-entropy gives the
papers' mean NLL exactly; OverTone is a drop-in alternative), to which the KL term and the weight
decay of ``LocateConfig`` are added (recorded apart from the objective's loss). Each step runs only
the blocks from the edited one up and only the token columns from the subject's last token on
(``models.tail``), and the vocabulary head only at the scored positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import EditStats, StepCallback
from overtone.editors.locate.config import LocateConfig
from overtone.editors.locate.subject import (
    AlignedRows,
    LookupRow,
    align_rows,
    drop_last_token,
    encode_rows,
    encode_subject_row,
)
from overtone.editors.training import default_stop, optimise
from overtone.models.loading import LoadedModel
from overtone.models.tail import TailPass
from overtone.objectives import Objective


class _StopForward(Exception):
    """Raised by a hook once every requested activation is read, to skip the remaining blocks."""


def _output_tensor(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


def pad_id(lm: LoadedModel) -> int:
    return lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0


@torch.no_grad()
def lookup_activations(
    lm: LoadedModel, rows: Sequence[LookupRow], taps: Sequence[tuple[nn.Module, str]], last_block: int
) -> list[torch.Tensor]:
    """For each ``(module, "in" | "out")`` tap, its input or output at every row's lookup token, [B, D] fp32.

    Runs blocks ``0..last_block`` only; every tapped module must lie in those blocks.
    """
    length = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), length), pad_id(lm), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row.ids)] = torch.tensor(row.ids)
        mask[i, : len(row.ids)] = 1
    device = lm.device
    ids, mask = ids.to(device), mask.to(device)
    index = (torch.arange(len(rows), device=device), torch.tensor([r.lookup for r in rows], device=device))
    found: list[torch.Tensor | None] = [None] * len(taps)

    def grab(i: int, kind: str):
        def hook(_module, args, output):
            x = args[0] if kind == "in" else _output_tensor(output)
            found[i] = x[index].float()

        return hook

    def stop(_module, _args, _output):
        raise _StopForward

    handles = [module.register_forward_hook(grab(i, kind)) for i, (module, kind) in enumerate(taps)]
    handles.append(lm.adapter.layers[lm.adapter.check_layer(last_block)].register_forward_hook(stop))
    try:
        lm.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [i for i, x in enumerate(found) if x is None]
    if missing:
        raise ValueError(f"taps {missing} were not reached within blocks 0..{last_block}")
    return [x for x in found if x is not None]


@dataclass
class ValueResult:
    """The optimised value of one case; ``init + delta`` is v*."""

    init: torch.Tensor  # [H] fp32 the module's output at the subject's last token of the bare prompt, unedited
    delta: torch.Tensor  # [H] fp32
    stats: EditStats  # value updates, the objective's loss and the regularisers at every forward pass, early stop

    @property
    def target(self) -> torch.Tensor:
        return self.init + self.delta


class ValueLogits:
    """The logits of one value-optimisation forward pass, with ``delta`` added at the subject's last token.

    A ``LogitSource`` for the shared loop (``editors/training.optimise``): a call returns the logits at
    the target tokens of every prompt variant ([variants, A, V], the bare prompt first) and keeps the
    log-probabilities after the KL prompt for ``extra_loss``. The first call's values are the unedited
    model's (``delta`` is still zero): ``reference``, ``kl_reference`` and ``init``. The hook that adds
    ``delta`` is in place only during a call, so an ``on_step`` callback sees the unedited model.
    """

    def __init__(self, lm: LoadedModel, batch: AlignedRows, module: nn.Module, block: int) -> None:
        self.adapter = lm.adapter
        self.module = module
        self.n_rewrite = batch.input_ids.size(0) - 1  # the last row is the KL prompt
        self.positions = batch.positions[: self.n_rewrite]
        self.labels = batch.labels[: self.n_rewrite]
        self.tail = TailPass(lm.adapter, batch.input_ids, batch.attention_mask, batch.position_ids, batch.cut, block)
        self.delta = torch.zeros(lm.model.get_input_embeddings().embedding_dim, device=lm.device, requires_grad=True)
        self.reference: torch.Tensor | None = None
        self.init: torch.Tensor | None = None
        self.kl_log_probs: torch.Tensor | None = None
        self.kl_reference: torch.Tensor | None = None

    def _inject(self, _module: nn.Module, _args: object, output: object) -> object:
        hidden = _output_tensor(output)
        if self.init is None:
            self.init = hidden[0, 0].detach().float().clone()
        # Column 0 of the tail is the subject's last token in every row.
        hidden = torch.cat([hidden[:, :1] + self.delta.to(hidden.dtype), hidden[:, 1:]], dim=1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def __call__(self) -> torch.Tensor:
        handle = self.module.register_forward_hook(self._inject)
        try:
            hidden = self.tail()
        finally:
            handle.remove()
        # One pass through the vocabulary head for every scored position: on a CPU the head's cost is
        # reading its weight, once forward and once backward, whatever the number of positions.
        rows = torch.arange(self.n_rewrite, device=hidden.device)[:, None]
        scored = torch.cat([hidden[rows, self.positions].flatten(0, 1), hidden[self.n_rewrite:, 0]])
        all_logits = self.adapter.logits(scored, fp32=True)
        logits = all_logits[: self.positions.numel()].view(*self.positions.shape, -1)
        self.kl_log_probs = torch.log_softmax(all_logits[self.positions.numel():].float(), dim=-1)
        if self.reference is None:
            self.reference = logits.detach()
            self.kl_reference = self.kl_log_probs.detach()
        return logits


def optimise_value(
    lm: LoadedModel,
    case: EditCase,
    module: nn.Module,
    block: int,
    prefixes: Sequence[str],
    objective: Objective,
    cfg: LocateConfig,
    on_step: StepCallback | None = None,
    steps: int | None = None,
) -> ValueResult:
    """Optimise the change of ``module``'s output (inside decoder block ``block``) at the subject's last token.

    ``prefixes[0]`` must be "" (the bare prompt), whose unedited output is ``init``. The loop is the one
    every gradient editor shares: ``cfg.steps`` updates at most (exactly ``steps`` when given), a step
    skipped and the optimisation stopped once the objective's loss is below ``cfg.stop_loss`` (or, with
    ``cfg.stop_when_clipped``, once every target token is clipped).
    """
    if not prefixes or prefixes[0] != "":
        raise ValueError("the first context prefix must be the empty one (the bare prompt)")
    rows = [drop_last_token(r) for r in encode_rows(lm.tokenizer, case, prefixes, True, cfg.missing_subject)]
    rows.append(encode_subject_row(lm.tokenizer, case, cfg.kl_prompt))
    source = ValueLogits(lm, align_rows(rows, pad_id(lm), lm.device), module, block)
    delta = source.delta
    optimiser = torch.optim.Adam([delta], lr=cfg.lr)

    def regularisers() -> torch.Tensor:
        """KL(edited || unedited) after the KL prompt, and the weight decay of delta (the reference code's form)."""
        assert source.kl_log_probs is not None and source.kl_reference is not None and source.init is not None
        logp = source.kl_log_probs
        kl = (logp.exp() * (logp - source.kl_reference)).sum(dim=-1).mean()
        return cfg.kl_factor * kl + cfg.weight_decay * torch.linalg.vector_norm(delta) / source.init.norm() ** 2

    def update(loss: torch.Tensor) -> None:
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        assert source.init is not None
        with torch.no_grad():
            limit = cfg.clamp_norm_factor * source.init.norm()
            norm = delta.norm()
            if norm > limit:
                delta.mul_(limit / norm)

    stats = optimise([case], objective, source, update, cfg.steps, default_stop(cfg.stop_loss, cfg.stop_when_clipped),
                     on_step, regularisers, exact_steps=steps)
    assert source.init is not None
    return ValueResult(init=source.init, delta=delta.detach(), stats=stats)
