"""LoRA's per-case forward: one adapter per case, B cases trained side by side without peft.

``edit_parallel`` of the LoRA editor (docs/parallel.md). The factors of all cases are stacked
([cases, r, in] and [cases, out, r] per adapted module) and applied row by row with the formulas of
peft's LoRA and AdaLoRA layers (``models.per_case.CaseLowRank``), each case with its own generator
(``factors``: the values it would draw alone), Adam state, AdaLoRA orthogonality term and stop. It is
a second implementation of the adapter forward beside peft's, on purpose: peft applies one adapter
set to a whole batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import StepCallback
from overtone.editors.lora.config import LoRAConfig
from overtone.editors.lora.factors import edit_generator, initial_factors, orthogonality, scaling
from overtone.editors.parallel import (
    ADAM_TEMPORARIES,
    EDIT_TOKENS,
    TARGET_TOKENS,
    CaseEdits,
    CaseMemory,
    CaseParameters,
    ModelShape,
)
from overtone.editors.training import TargetLogits, default_stop, optimise_cases
from overtone.models.loading import LoadedModel
from overtone.models.per_case import CaseChange, CaseDropout, CaseLowRank, patched
from overtone.objectives import Objective
from overtone.tokens import encode_pairs


def case_memory(shape: ModelShape, cfg: LoRAConfig, modules: Sequence[tuple[int, int]] | None = None,
                blocks: int | None = None) -> CaseMemory:
    """One case of a parallel LoRA edit: its factors (``modules``: (in, out) of each adapted module; default
    q and v of every layer) with gradient and two Adam moments, kept for evaluation; the activations of
    one step through ``blocks`` blocks (default all), and per adapted module the dropped-out input and
    its product with A."""
    if modules is None:
        modules = [(shape.hidden, shape.heads * shape.head_dim), (shape.hidden, shape.kv_heads * shape.head_dim)]
        modules = modules * shape.layers
    blocks = shape.layers if blocks is None else blocks
    rank = cfg.init_rank if cfg.variant == "adalora" else cfg.rank_value
    factors = sum(rank * (n_in + n_out) + (rank if cfg.variant == "adalora" else 0) for n_in, n_out in modules)
    adapters = EDIT_TOKENS * sum(2 * n_in + rank for n_in, _ in modules) * 4
    return CaseMemory((20 + ADAM_TEMPORARIES) * factors,
                      shape.step_activations(1, EDIT_TOKENS, blocks, TARGET_TOKENS) + adapters,
                      shape.fp32_head)


def edit_cases(lm: LoadedModel, cfg: LoRAConfig, objective: Objective, paths: Sequence[str],
               features: Sequence[tuple[int, int]], first_layer: int, cases: Sequence[EditCase],
               on_step: StepCallback | None = None, steps: Sequence[int | None] | None = None) -> CaseEdits:
    """Edit each of ``cases`` alone, all at once: adapters on the modules at ``paths`` ((in, out)
    ``features``), replaying from ``first_layer``; the model itself is never changed."""
    start = time.perf_counter()
    batch = encode_pairs(lm.tokenizer, [c.prompt for c in cases], [c.target for c in cases],
                         lm.device)
    generators = [edit_generator(cfg, [case], lm.device) for case in cases]
    initial = [initial_factors(cfg, features, g, lm.device) for g in generators]  # per case, per adapted module
    params = CaseParameters({f"{i}.{name}": torch.stack([factors[i][name] for factors in initial])
                             for i in range(len(paths)) for name in initial[0][i]},
                            cfg.lr, cfg.weight_decay)
    modules = [lm.model.get_submodule(path) for path in paths]
    scale, divisor = scaling(cfg)
    adalora = cfg.variant == "adalora"

    def changes(values: dict[str, torch.Tensor], dropout: CaseDropout | None) -> dict[nn.Module, CaseChange]:
        out: dict[nn.Module, CaseChange] = {}
        for i, module in enumerate(modules):
            down = values[f"{i}.A"] * values[f"{i}.E"] if adalora else values[f"{i}.A"]
            out[module] = CaseLowRank(down, values[f"{i}.B"], scale, divisor, dropout)
        return out

    training = [True]  # dropout on, except in the stop decision's pass and in views

    def present(positions: list[int] | None = None, dropout: bool = False) -> dict[nn.Module, CaseChange]:
        values = {name: t if positions is None else t[positions] for name, t in params.tensors.items()}
        drop = CaseDropout(cfg.dropout, [generators[c] for c in params.cases]) if dropout else None
        return changes(values, drop)

    source = TargetLogits(lm.adapter, batch, first_layer,
                          context=lambda: patched(present(dropout=training[0] and cfg.dropout > 0), source.rows))

    def without_dropout() -> torch.Tensor:
        training[0] = False
        try:
            return source()
        finally:
            training[0] = True

    def regulariser() -> torch.Tensor:
        pairs = [(params[f"{i}.A"], params[f"{i}.B"]) for i in range(len(modules))]
        return cfg.orth_reg_weight * orthogonality(pairs)

    stops = cfg.stop_loss > 0 or cfg.stop_when_clipped
    stats = optimise_cases(cases, objective, source, params, cfg.steps,
                           default_stop(cfg.stop_loss, cfg.stop_when_clipped), on_step,
                           extra_loss=regulariser if adalora else None,
                           check=without_dropout if stops and cfg.dropout > 0 else None, exact_steps=steps,
                           view=lambda p: patched(present([p]), None))
    for s in stats:
        s.time_s = (time.perf_counter() - start) / len(cases)
    return CaseEdits(list(cases), stats, first_layer, changes(params.finish(), None))
