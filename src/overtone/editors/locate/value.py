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

from collections.abc import Callable, Sequence
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
from overtone.editors.parallel import CaseParameters
from overtone.editors.training import default_stop, optimise_cases
from overtone.models.loading import LoadedModel
from overtone.models.per_case import CaseRows
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
    """The logits of one value-optimisation forward pass, with each case's ``delta`` added at its subject's last token.

    A ``CaseLogitSource`` for the shared loop (``editors/training.optimise_cases``). The rows are, case
    after case, the case's ``variants`` prompt variants (the bare prompt first) and its KL prompt. A
    call returns the logits at the target tokens of every case's variants ([cases x variants, A, V])
    and keeps each case's log-probabilities after its KL prompt for the regularisers. ``delta()`` is the
    present [cases, H] change of the cases still training; ``keep`` drops the rows of the others. The
    first call's values are the unedited model's (``delta`` is still zero): ``reference``,
    ``kl_reference`` and ``init`` (per case). The hook that adds ``delta`` is in place only during a
    call, so an ``on_step`` callback sees the unedited model.
    """

    def __init__(self, lm: LoadedModel, batch: AlignedRows, module: nn.Module, block: int, variants: int,
                 delta: Callable[[], torch.Tensor], reference: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        self.adapter = lm.adapter
        self.module = module
        self.variants = variants
        self.delta = delta
        self.tail = TailPass(lm.adapter, batch.input_ids, batch.attention_mask, batch.position_ids, batch.cut, block)
        self._positions, self._labels = batch.positions, batch.labels
        self.cases = list(range(batch.input_ids.size(0) // (variants + 1)))  # the case of each present position
        self._select(self.cases)
        # the unedited model's logits when captured before a sequence of edits (``Editor.reference_for``),
        # else the first call's
        self.reference: torch.Tensor | None = reference(self.labels)
        self.init: torch.Tensor | None = None  # [cases, H] of the cases present
        self.values0: dict[int, torch.Tensor] = {}  # every case's unedited value, from the first call
        self.kl_log_probs: torch.Tensor | None = None  # [cases, V]
        self.kl_reference: torch.Tensor | None = None

    def _select(self, cases: list[int]) -> None:
        """Index the rows of ``cases`` (of the tail pass as it is now)."""
        per_case = self.variants + 1

        def index(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=self._positions.device)

        self.rows = CaseRows.consecutive([self.variants] * len(cases))
        self._rewrite = index([c * per_case + v for c in cases for v in range(self.variants)])
        self._kl = index([c * per_case + self.variants for c in cases])
        self._bare = index([c * per_case for c in cases])
        self._owner = index([c for c in range(len(cases)) for _ in range(per_case)])
        self.positions = self._positions[self._rewrite]
        self.labels = self._labels[self._rewrite]

    def keep(self, positions: Sequence[int]) -> None:
        """Keep the cases at ``positions`` only: their rows, references and initial values."""
        if list(positions) == list(range(self.rows.n_cases)):
            return
        per_case = self.variants + 1
        rows = [c * per_case + v for c in positions for v in range(per_case)]
        self.tail.keep(rows)
        index = torch.tensor(rows, dtype=torch.long, device=self._positions.device)
        self._positions, self._labels = self._positions[index], self._labels[index]
        cases = torch.tensor(list(positions), dtype=torch.long, device=self._positions.device)
        if self.init is not None:
            self.init = self.init[cases]
        if self.reference is not None:
            self.reference = self.reference.view(self.rows.n_cases, self.variants, *self.reference.shape[1:])[cases]
            self.reference = self.reference.flatten(0, 1)
        if self.kl_reference is not None:
            self.kl_reference = self.kl_reference[cases]
        self.cases = [self.cases[p] for p in positions]
        self._select(list(range(len(positions))))

    def _inject(self, _module: nn.Module, _args: object, output: object) -> object:
        hidden = _output_tensor(output)
        if self.init is None:
            self.init = hidden[self._bare, 0].detach().float().clone()
            self.values0 = dict(zip(self.cases, self.init, strict=True))
        delta = self.delta()
        # Column 0 of the tail is the subject's last token in every row; one case: its delta on every row.
        added = delta[0] if delta.size(0) == 1 else delta[self._owner][:, None]
        hidden = torch.cat([hidden[:, :1] + added.to(hidden.dtype), hidden[:, 1:]], dim=1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def __call__(self) -> torch.Tensor:
        handle = self.module.register_forward_hook(self._inject)
        try:
            hidden = self.tail()
        finally:
            handle.remove()
        # One pass through the vocabulary head for every scored position: on a CPU the head's cost is
        # reading its weight, once forward and once backward, whatever the number of positions.
        scored = torch.cat([hidden[self._rewrite[:, None], self.positions].flatten(0, 1), hidden[self._kl, 0]])
        all_logits = self.adapter.logits(scored, fp32=True)
        logits = all_logits[: self.positions.numel()].view(*self.positions.shape, -1)
        self.kl_log_probs = torch.log_softmax(all_logits[self.positions.numel():].float(), dim=-1)
        if self.kl_reference is None:
            self.kl_reference = self.kl_log_probs.detach()
        if self.reference is None:
            self.reference = logits.detach()
        return logits


def optimise_values(
    lm: LoadedModel,
    cases: Sequence[EditCase],
    module: nn.Module,
    block: int,
    prefixes: Sequence[str],
    objective: Objective,
    cfg: LocateConfig,
    on_step: StepCallback | None = None,
    steps: Sequence[int | None] | None = None,
    reference: Callable[[torch.Tensor], torch.Tensor | None] = lambda _labels: None,
) -> list[ValueResult]:
    """Optimise, for each case on its own, the change of ``module``'s output (inside decoder block ``block``)
    at the subject's last token; all cases in one batch (one case: the sequential edit).

    ``prefixes[0]`` must be "" (the bare prompt), whose unedited output is ``init``. The loop is the one
    every gradient editor shares: ``cfg.steps`` updates at most (exactly ``steps[i]`` when given), a step
    skipped and the optimisation stopped once the objective's loss is below ``cfg.stop_loss`` (or, with
    ``cfg.stop_when_clipped``, once every target token is clipped). Every case has its own delta, Adam
    state, regularisers, clamp and stop (``optimise_cases``). ``reference(labels)`` gives the unedited
    model's target logits for an objective that needs them (``Editor.reference_for``), or None.
    """
    if not prefixes or prefixes[0] != "":
        raise ValueError("the first context prefix must be the empty one (the bare prompt)")
    rows = []
    for case in cases:
        rows += [drop_last_token(r) for r in encode_rows(lm.tokenizer, case, prefixes, True, cfg.missing_subject)]
        rows.append(encode_subject_row(lm.tokenizer, case, cfg.kl_prompt))
    hidden = lm.model.get_input_embeddings().embedding_dim
    params = CaseParameters({"delta": torch.zeros(len(cases), hidden, device=lm.device)}, cfg.lr)
    source = ValueLogits(lm, align_rows(rows, pad_id(lm), lm.device), module, block, len(prefixes),
                         lambda: params["delta"], reference)

    def regularisers() -> torch.Tensor:
        """Per case: KL(edited || unedited) after its KL prompt, and the weight decay of its delta (the reference
        code's form)."""
        assert source.kl_log_probs is not None and source.kl_reference is not None and source.init is not None
        logp = source.kl_log_probs
        kl = (logp.exp() * (logp - source.kl_reference)).sum(dim=-1)
        decay = torch.linalg.vector_norm(params["delta"], dim=-1) / source.init.norm(dim=-1) ** 2
        return cfg.kl_factor * kl + cfg.weight_decay * decay

    def clamp() -> None:
        """Each case's delta back onto its ball of radius ``clamp_norm_factor * |v0|``."""
        assert source.init is not None
        with torch.no_grad():
            delta = params["delta"]
            limit = cfg.clamp_norm_factor * source.init.norm(dim=-1)
            norm = delta.norm(dim=-1)
            delta.mul_(torch.where(norm > limit, limit / norm, torch.ones_like(norm))[:, None])

    stats = optimise_cases(cases, objective, source, params, cfg.steps,
                           default_stop(cfg.stop_loss, cfg.stop_when_clipped), on_step, regularisers,
                           exact_steps=steps, after_step=clamp)
    deltas = params.finish()["delta"]
    # every case has had a pass (also with a budget of 0 updates: the loop measures before it stops)
    return [ValueResult(init=source.values0[i], delta=deltas[i], stats=case_stats)
            for i, case_stats in enumerate(stats)]


def optimise_value(lm: LoadedModel, case: EditCase, module: nn.Module, block: int, prefixes: Sequence[str],
                   objective: Objective, cfg: LocateConfig, on_step: StepCallback | None = None,
                   steps: int | None = None,
                   reference: Callable[[torch.Tensor], torch.Tensor | None] = lambda _labels: None) -> ValueResult:
    """``optimise_values`` for one case: the value of a sequential edit."""
    return optimise_values(lm, [case], module, block, prefixes, objective, cfg, on_step,
                           None if steps is None else [steps], reference)[0]
