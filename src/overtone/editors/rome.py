"""ROME: a rank-one update of one MLP output projection (Meng et al., 2022, "Locating and Editing
Factual Associations in GPT").

For each fact, at layer L's ``mlp_out``:

* the key k* is the projection's input at the subject's last token, averaged over the bare prompt
  and its context-prefixed copies; k is the key in the bare prompt;
* the value v* = v0 + delta is optimised so that the model predicts the target (``locate.value``,
  with any ``Objective``; CE is the paper's NLL);
* the weight becomes W + (v* - W k) u^T / (u^T k) with u = C^-1 k* (``mom2_adjustment``, the paper;
  C = E[k k^T] from ``overtone.stats``) or u = k* (the reference toolkit's Llama setting). So the
  bare prompt's key now maps exactly to v*, while keys orthogonal to u (in the C^-1 metric) are
  untouched. As in the reference code, v* is reached at the bare prompt's key k.

``edit(cases)`` with several cases applies one rank-one update per case, one after the other (the
reference behaviour); ``revert`` restores the matrix bit for bit.

``edit_parallel(cases)`` edits each case against the unedited weights, all at once: the keys in one
batch, the values in one batched optimisation (``locate.value.optimise_values``), and each case's
rank-one update kept as a per-case low-rank term (x u_i) r_i that only the rows of case i see
(``models.per_case.CaseLowRank``), never as B copies of the matrix.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import EditHandle, EditStats, SavedEdit, StepCallback, UpdateLog
from overtone.editors.locate import LocateConfig, context_prefixes, encode_rows, lookup_activations, optimise_value
from overtone.editors.locate.editor import LocateEditor
from overtone.editors.locate.update import add_update, apply_factors, factor_product, saved_factors, snapshot
from overtone.editors.locate.value import optimise_values
from overtone.editors.parallel import TARGET_TOKENS, CaseEdits, CaseMemory, ModelShape
from overtone.editors.presets import editor_presets
from overtone.models.loading import LoadedModel
from overtone.models.per_case import CaseLowRank
from overtone.objectives import Objective
from overtone.stats import log_progress, second_moments

# The reference toolkit's ROME edits layer 5 of Llama-2-7B's 32; other models keep that relative depth,
# unless editors/presets/rome.yaml names a layer for the model (by its name; the embedded model's layer 7
# comes from a layer sweep on ZsRE development cases, docs/locate.md).
REFERENCE_DEPTH = 5 / 32


@dataclass(frozen=True)
class ROMEConfig(LocateConfig):
    """ROME settings; the value-optimisation defaults are the reference toolkit's for Llama-2-7B."""

    layer: int | None = field(default=None, metadata={"help": "edited layer (default: per model, see docs/locate.md)"})
    mom2_adjustment: bool = field(
        default=True, metadata={"help": "u = C^-1 k* (the paper); False: u = k* (the toolkit's Llama setting)"}
    )


def default_layer(lm: LoadedModel) -> int:
    preset = editor_presets("rome", ROMEConfig).models.get(lm.name)
    if preset is not None and "layer" in preset.settings:
        return preset.settings["layer"]
    return min(lm.adapter.num_layers - 1, round(REFERENCE_DEPTH * lm.adapter.num_layers))


def value_memory(shape: ModelShape, cfg: LocateConfig, block: int) -> CaseMemory:
    """One case of a parallel value optimisation (ROME, MEMIT): its delta with gradient and Adam moments,
    and the activations of its prompt variants and KL prompt through the blocks from ``block`` up (their
    columns from the subject's last token on, about half of a row), plus their cached prefixes."""
    variants = 1 + sum(count for _, count in cfg.context_lengths)
    rows, tail = variants + 1, 16
    prefix = rows * tail * 2 * shape.kv_heads * shape.head_dim * shape.layers * shape.dtype_bytes
    return CaseMemory(16 * shape.hidden,
                      shape.step_activations(rows, tail, shape.layers - block, variants * TARGET_TOKENS + 1) + prefix,
                      shape.fp32_head)


def case_memory(shape: ModelShape, cfg: LocateConfig, layer: int) -> CaseMemory:
    """One case of a parallel ROME edit: its value optimisation, then u and the update's column, kept; once, the
    write of a sequential edit (``--parallel 1``; a window of more cases keeps the update per case instead, so
    there this part is a margin)."""
    value = value_memory(shape, cfg, layer)
    return CaseMemory(value.state + 4 * (shape.hidden + shape.intermediate), value.activations,
                      value.shared + shape.mlp_write())


class ROME(LocateEditor):
    name = "rome"
    config_class = ROMEConfig
    parallel_refusal = None

    def __init__(self, lm: LoadedModel, config: ROMEConfig | None = None, objective: Objective | None = None):
        config = config or ROMEConfig()
        if config.layer is None:
            config = replace(config, layer=default_layer(lm))
        assert config.layer is not None
        lm.adapter.check_layer(config.layer)
        if objective is None:
            raise ValueError("ROME needs an objective for its value (e.g. overtone.objectives.CrossEntropy())")
        super().__init__(lm, config, objective)
        # Made once, from the model as it is now: later edits in a sequence do not change them.
        self.prefixes = context_prefixes(lm, config.context_lengths, config.context_seed)
        self.inverse_mom2: torch.Tensor | None = None
        self.mom2_info: dict[str, Any] | None = None
        if config.mom2_adjustment:
            stat = second_moments(lm, [config.layer], config.moment_spec(), log_progress("ROME statistics"))
            moment = stat[config.layer]
            self.inverse_mom2 = torch.linalg.inv(moment.matrix.double()).to(lm.device)
            self.mom2_info = {"tokens": moment.tokens, "weights_sha256": moment.key["weights_sha256"],
                              "corpus_sha256": moment.key["corpus_sha256"]}
        self.log = UpdateLog()

    @property
    def first_layer(self) -> int:
        return self.config.layer

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "context_prefixes": list(self.prefixes), "mom2": self.mom2_info}

    def edit(self, cases: Sequence[EditCase], on_step: StepCallback | None = None,
             steps: int | None = None) -> EditHandle:
        start = time.perf_counter()
        module = self.lm.adapter.module("mlp_out", self.config.layer)
        restore = snapshot([module.weight])
        mark = self.log.begin({self._weight_name: module.weight})

        def revert() -> None:
            restore()
            self.log.revert_to(mark)

        stats = EditStats()
        stops = []
        try:
            for case in cases:
                stops.append(self._edit_one(case, module, stats, on_step, steps))
        except BaseException:
            revert()
            raise
        stats.stopped_early = all(r is not None for r in stops)
        stats.stop_reason = stops[0] if stats.stopped_early and len(set(stops)) == 1 else None
        stats.time_s = time.perf_counter() - start
        return EditHandle(revert, first_layer=self.config.layer, stats=stats, restores=(module.weight,))

    def _edit_one(self, case: EditCase, module: torch.nn.Module, stats: EditStats,
                  on_step: StepCallback | None, steps: int | None) -> str | None:
        """Edit one case into ``module``; returns why its value optimisation stopped early (None: it did not)."""
        cfg: ROMEConfig = self.config
        assert self.objective is not None and cfg.layer is not None
        rows = encode_rows(self.lm.tokenizer, case, self.prefixes, with_answer=False, missing=cfg.missing_subject)
        keys = lookup_activations(self.lm, rows, [(module, "in")], cfg.layer)[0]  # [prefixes, I]
        u = self._direction(keys.mean(dim=0))
        value = optimise_value(self.lm, case, module, cfg.layer, self.prefixes, self.objective, cfg, on_step, steps,
                               lambda labels: self.reference_for([case], labels))
        stats.steps += value.stats.steps
        stats.losses += value.stats.losses
        stats.extra_losses += value.stats.extra_losses
        stats.add_activity(value.stats.activity)
        # v0 was read as this module's output at the bare prompt's key, so v* - W k (- bias) = delta.
        right = value.delta / torch.dot(keys[0], u)
        add_update(self.lm.adapter, module.weight, factor_product(right, u))
        self.log.add((self._weight_name, right, u))
        return value.stats.stop_reason

    def _direction(self, k_star: torch.Tensor) -> torch.Tensor:
        """u = C^-1 k* (or k*), normalised; ``k_star`` is [I] or one row per case [cases, I]."""
        if self.inverse_mom2 is not None:
            k = k_star.double()
            u = (self.inverse_mom2 @ k if k.dim() == 1 else (self.inverse_mom2 @ k.mT).mT).float()
        else:
            u = k_star
        return u / u.norm(dim=-1, keepdim=True)

    def case_memory(self) -> CaseMemory:
        return case_memory(ModelShape.of(self.lm.model.config, self.lm.dtype), self.config, self.config.layer)

    def edit_parallel(self, cases: Sequence[EditCase], on_step: StepCallback | None = None,
                      steps: Sequence[int | None] | None = None) -> CaseEdits:
        cfg: ROMEConfig = self.config
        assert self.objective is not None and cfg.layer is not None
        start = time.perf_counter()
        module = self.lm.adapter.module("mlp_out", cfg.layer)
        rows = [row for case in cases
                for row in encode_rows(self.lm.tokenizer, case, self.prefixes, with_answer=False,
                                       missing=cfg.missing_subject)]
        keys = lookup_activations(self.lm, rows, [(module, "in")], cfg.layer)[0]
        keys = keys.view(len(cases), len(self.prefixes), -1)
        u = self._direction(keys.mean(dim=1))  # [cases, I]
        values = optimise_values(self.lm, cases, module, cfg.layer, self.prefixes, self.objective, cfg, on_step,
                                 steps, lambda labels: self.reference_for(cases, labels))
        # v0 was read as this module's output at the bare prompt's key, so v* - W k (- bias) = delta.
        right = torch.stack([v.delta for v in values]) / (keys[:, 0] * u).sum(dim=-1, keepdim=True)
        stats = [v.stats for v in values]
        for s in stats:
            s.time_s = (time.perf_counter() - start) / len(cases)
        return CaseEdits(list(cases), stats, cfg.layer, {module: CaseLowRank(u[:, None, :], right[:, :, None])})
    @property
    def _weight_name(self) -> str:
        return f"{self.lm.adapter.path('mlp_out', self.config.layer)}.weight"

    def saved_edit(self) -> SavedEdit:
        """The rank-one updates of the live edits, in order: each one's factors (value change, key direction)."""
        return saved_factors(self.lm, self.log)

    @classmethod
    def apply_saved(cls, lm: LoadedModel, config: ROMEConfig, saved: SavedEdit,
                    objective: Objective | None = None) -> EditHandle:
        return apply_factors(lm, saved, first_layer=config.layer)
