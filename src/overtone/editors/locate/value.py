"""Keys and values at the subject's last token: what ROME and MEMIT read and what they optimise.

``lookup_activations`` reads a module's input or output at the lookup token of each row, running
only the blocks up to the last one it needs.

``optimise_value`` finds the vector v* that a module should output at the subject's last token so
that the model predicts the new target (ROME's and MEMIT's "value"): a change ``delta`` is added to
the module's output at that token in the bare prompt, in every context-prefixed copy of it, and in
the KL prompt, and optimised with Adam. The target term is an ``Objective`` (cross-entropy gives the
papers' mean NLL exactly; OverTone is a drop-in alternative), to which the KL term and the weight
decay of ``LocateConfig`` are added. Each step runs only the blocks from the edited one up and only
the token columns from the subject's last token on (``models.tail``), and the vocabulary head only at
the scored positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import EditError, StepCallback, StepInfo
from overtone.editors.locate.config import LocateConfig
from overtone.editors.locate.subject import LookupRow, align_rows, drop_last_token, encode_rows, encode_subject_row
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
    losses: list[float]  # total loss at every forward pass
    steps: int  # optimiser updates
    stopped_early: bool

    @property
    def target(self) -> torch.Tensor:
        return self.init + self.delta


def optimise_value(
    lm: LoadedModel,
    case: EditCase,
    module: nn.Module,
    block: int,
    prefixes: Sequence[str],
    objective: Objective,
    cfg: LocateConfig,
    on_step: StepCallback | None = None,
) -> ValueResult:
    """Optimise the change of ``module``'s output (inside decoder block ``block``) at the subject's last token.

    ``prefixes[0]`` must be "" (the bare prompt), whose unedited output is ``init``.
    """
    if not prefixes or prefixes[0] != "":
        raise ValueError("the first context prefix must be the empty one (the bare prompt)")
    adapter = lm.adapter
    rows = [drop_last_token(r) for r in encode_rows(lm.tokenizer, case, prefixes, True, cfg.missing_subject)]
    rows.append(encode_subject_row(lm.tokenizer, case, cfg.kl_prompt))
    batch = align_rows(rows, pad_id(lm), lm.device)
    n_rewrite = len(rows) - 1
    tail = TailPass(adapter, batch.input_ids, batch.attention_mask, batch.position_ids, batch.cut, block)

    delta = torch.zeros(lm.model.get_input_embeddings().embedding_dim, device=lm.device, requires_grad=True)
    init: list[torch.Tensor] = []

    def inject(_module, _args, output):
        hidden = _output_tensor(output)
        if not init:
            init.append(hidden[0, 0].detach().float().clone())
        # Column 0 of the tail is the subject's last token in every row.
        hidden = torch.cat([hidden[:, :1] + delta.to(hidden.dtype), hidden[:, 1:]], dim=1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    rows_index = torch.arange(n_rewrite, device=lm.device)[:, None]
    positions, labels = batch.positions[:n_rewrite], batch.labels[:n_rewrite]
    optimiser = torch.optim.Adam([delta], lr=cfg.lr)
    result = ValueResult(init=torch.empty(0), delta=delta, losses=[], steps=0, stopped_early=False)
    reference = kl_init = None
    handle = module.register_forward_hook(inject)
    try:
        for step in range(cfg.steps):
            hidden = tail()
            # One pass through the vocabulary head for every scored position: on a CPU the head's
            # cost is reading its weight, once forward and once backward, whatever the positions.
            scored = torch.cat([hidden[rows_index, positions].flatten(0, 1), hidden[n_rewrite:, 0]])
            all_logits = adapter.logits(scored)
            logits = all_logits[: positions.numel()].view(*positions.shape, -1)
            if objective.needs_reference and reference is None:
                reference = logits.detach()  # delta is still zero: the unedited model's logits
            out = objective(logits, labels, reference)
            kl_logp = torch.log_softmax(all_logits[positions.numel():].float(), dim=-1)
            if kl_init is None:
                kl_init = kl_logp.detach()
            kl = (kl_logp.exp() * (kl_logp - kl_init)).sum(dim=-1).mean()
            v0 = init[0]
            decay = cfg.weight_decay * torch.linalg.vector_norm(delta) / v0.norm() ** 2
            loss = out.loss + cfg.kl_factor * kl + decay
            value = loss.item()
            if not math.isfinite(value):
                raise EditError(f"case {case.case_id}: the value loss ({objective.name}) is {value} at step {step}")
            result.losses.append(value)
            if on_step is not None:
                on_step(StepInfo(step=step, loss=value, output=out, cases=[case]))
            if value < cfg.stop_loss or out.active_tokens == 0:
                result.stopped_early = True
                break
            if step == cfg.steps - 1:
                break  # the reference code never steps after its last forward pass
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                limit = cfg.clamp_norm_factor * v0.norm()
                norm = delta.norm()
                if norm > limit:
                    delta.mul_(limit / norm)
            result.steps += 1
    finally:
        handle.remove()
    result.init = init[0]
    result.delta = delta.detach()
    return result
