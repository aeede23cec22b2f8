"""FT-M: constrained fine-tuning of one MLP output projection on the target tokens only.

The reference toolkit's ``FT`` with ``objective_optimization: target_new`` (docs/protocol.md (c)):
the loss covers the target tokens of ``prompt + " " + target``, one ``down_proj`` matrix is trained
with Adam, a step is skipped and training stops once the objective's loss falls below ``stop_loss``.
The objective is pluggable; the loop and its early stop are shared with every gradient editor
(``editors/training.py``). OverTone's per-token loss is floored at epsilon, so with epsilon >= 0.01
its loss never falls below the 0.01 threshold and an OverTone edit runs all its steps, as it did
inside the reference toolkit's FT-M in the paper; ``stop_when_clipped`` stops it once every token is
clipped instead.

Speed: the block input of the edited layer cannot change, so the first step records it during a full
pass and every later step runs only the blocks from the edited one up (``models.replay``), and the
vocabulary head only at the target positions.

Parallel editing (``edit_parallel``): each case trains its own copy of the matrix, [cases, out, in] in
float32 with one Adam whose state rows are per case; the rows of case i go through copy i only
(``models.per_case.CaseWeights``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import (
    EditHandle,
    Editor,
    EditStats,
    SavedEdit,
    StepCallback,
    UpdateLog,
    config_problems,
    max_length_field,
)
from overtone.editors.locate.update import add_change, changes_since, snapshot
from overtone.editors.parallel import (
    ADAM_TEMPORARIES,
    EDIT_TOKENS,
    TARGET_TOKENS,
    CaseEdits,
    CaseMemory,
    CaseParameters,
    ModelShape,
)
from overtone.editors.presets import overtone_preset
from overtone.editors.training import TargetLogits, default_stop, optimise, optimise_cases, stop_when_clipped_field
from overtone.models.loading import LoadedModel
from overtone.models.per_case import CaseWeights, patched
from overtone.objectives import Objective
from overtone.tokens import encode_pairs

# EasyEdit edits layer 21 of Llama-2-7B's 32 (relative depth 0.66). We keep that depth for any model:
# layer round(0.66 * N). For the embedded SmolLM2-135M (30 layers) this gives layer 20, the layer the
# published anchors for this model use (docs: anchors.md), so results stay comparable.
DEFAULT_RELATIVE_DEPTH = 21 / 32


def default_layer(num_layers: int) -> int:
    return min(num_layers - 1, round(DEFAULT_RELATIVE_DEPTH * num_layers))


@dataclass(frozen=True)
class FTMConfig:
    """FT-M hyper-parameters; defaults are the reference toolkit's for Llama-2-7B / Llama-3-8B."""

    layer: int | None = field(default=None, metadata={"help": "edited layer (default: round(21/32 * layers))"})
    lr: float = field(default=5e-4, metadata={"help": "Adam learning rate"})
    steps: int = field(default=25, metadata={"help": "maximum optimisation steps"})
    stop_loss: float = field(
        default=1e-2, metadata={"help": "skip the step and stop when the objective's loss is below"})
    stop_when_clipped: bool = stop_when_clipped_field()
    weight_decay: float = 0.0
    norm_constraint: float | None = field(
        default=None, metadata={"help": "clamp each weight to within this distance of its original value"}
    )
    max_length: int | None = max_length_field()

    def __post_init__(self) -> None:
        config_problems("FT-M", [], self.steps, self.lr)


def case_memory(shape: ModelShape, layer: int) -> CaseMemory:
    """One case of a parallel FT-M edit: its float32 matrix, gradient and two Adam moments, Adam's temporaries
    (``ADAM_TEMPORARIES``), a copy and its gradient in the model's dtype when that is not float32, the final
    matrix kept for evaluation, and the activations of one step through the blocks from ``layer`` up."""
    n = shape.hidden * shape.intermediate
    cast = 2 * n * shape.dtype_bytes if shape.dtype_bytes != 4 else 0
    state = (16 + ADAM_TEMPORARIES) * n + cast + n * shape.dtype_bytes
    return CaseMemory(state, shape.step_activations(1, EDIT_TOKENS, shape.layers - layer, TARGET_TOKENS),
                      shape.fp32_head)


class FTM(Editor):
    name = "ft-m"
    config_class = FTMConfig
    parallel_refusal = None
    overtone_defaults = overtone_preset("ft-m", FTMConfig)  # chosen on ZsRE dev records: presets/ft-m.yaml

    def __init__(self, lm: LoadedModel, config: FTMConfig | None = None, objective: Objective | None = None):
        config = config or FTMConfig()
        if config.layer is None:
            config = replace(config, layer=default_layer(lm.adapter.num_layers))
        assert config.layer is not None
        lm.adapter.check_layer(config.layer)
        if objective is None:
            raise ValueError("FT-M needs an objective (e.g. overtone.objectives.CrossEntropy())")
        super().__init__(lm, config, objective)
        self.log = UpdateLog()

    @property
    def first_layer(self) -> int:
        return self.config.layer

    def edit(self, cases: Sequence[EditCase], on_step: StepCallback | None = None,
             steps: int | None = None) -> EditHandle:
        cfg: FTMConfig = self.config
        assert self.objective is not None and cfg.layer is not None
        start = time.perf_counter()
        batch = encode_pairs(self.lm.tokenizer, [c.prompt for c in cases], [c.target for c in cases],
                             self.lm.device)
        weight = self.lm.adapter.weight("mlp_out", cfg.layer)
        original = weight.detach().clone()
        mark = self.log.begin({f"{self.lm.adapter.path('mlp_out', cfg.layer)}.weight": weight})
        # Low-precision weights are trained through an fp32 master copy, so small Adam steps are not lost.
        master = weight if weight.dtype == torch.float32 else original.float().requires_grad_(True)
        optimiser = torch.optim.Adam([master], lr=cfg.lr, weight_decay=cfg.weight_decay)

        def update(loss: torch.Tensor) -> None:
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if master is not weight:
                master.grad = weight.grad.float()
                weight.grad = None
            optimiser.step()
            with torch.no_grad():
                if cfg.norm_constraint is not None:
                    master.copy_(torch.clamp(master, original - cfg.norm_constraint, original + cfg.norm_constraint))
                if master is not weight:
                    weight.copy_(master)

        def revert() -> None:
            with torch.no_grad():
                weight.copy_(original)
            self.log.revert_to(mark)

        weight.requires_grad_(True)
        try:
            stats = optimise(cases, self.objective, TargetLogits(self.lm.adapter, batch, cfg.layer,
                                                                    reference=self.reference_for(cases, batch.labels)),
                             update, cfg.steps, default_stop(cfg.stop_loss, cfg.stop_when_clipped), on_step,
                             exact_steps=steps)
        except BaseException:
            revert()
            raise
        finally:
            weight.requires_grad_(False)
            weight.grad = None
        stats.time_s = time.perf_counter() - start
        return EditHandle(revert, first_layer=cfg.layer, stats=stats, restores=(weight,))

    def case_memory(self) -> CaseMemory:
        return case_memory(ModelShape.of(self.lm.model.config, self.lm.dtype), self.config.layer)

    def edit_parallel(self, cases: Sequence[EditCase], on_step: StepCallback | None = None,
                      steps: Sequence[int | None] | None = None) -> CaseEdits:
        cfg: FTMConfig = self.config
        assert self.objective is not None and cfg.layer is not None
        start = time.perf_counter()
        adapter = self.lm.adapter
        batch = encode_pairs(self.lm.tokenizer, [c.prompt for c in cases], [c.target for c in cases],
                             self.lm.device)
        module = adapter.module("mlp_out", cfg.layer)
        weight = module.weight
        original = weight.detach()
        # the float32 master of every case, trained as the sequential edit trains its one master
        params = CaseParameters({"weight": original.float().expand(len(cases), *original.shape)}, cfg.lr,
                                cfg.weight_decay)

        def change() -> CaseWeights:
            master = params["weight"]
            return CaseWeights(master if master.dtype == weight.dtype else master.to(weight.dtype),
                               adapter.arch.conv1d)

        source = TargetLogits(adapter, batch, cfg.layer, context=lambda: patched({module: change()}, source.rows))

        def clamp() -> None:
            if cfg.norm_constraint is not None:
                with torch.no_grad():
                    master = params["weight"]
                    master.copy_(torch.clamp(master, original - cfg.norm_constraint, original + cfg.norm_constraint))

        stats = optimise_cases(cases, self.objective, source, params, cfg.steps,
                               default_stop(cfg.stop_loss, cfg.stop_when_clipped), on_step, exact_steps=steps,
                               after_step=clamp,
                               view=lambda p: patched({module: change().select([p])}, None))
        final = params.finish()["weight"].to(weight.dtype)
        for s in stats:
            s.time_s = (time.perf_counter() - start) / len(cases)
        return CaseEdits(list(cases), stats, cfg.layer, {module: CaseWeights(final, adapter.arch.conv1d)})
    def saved_edit(self) -> SavedEdit:
        """The change of the edited matrix since before the live edits, at twice its precision, so that
        adding it back gives the edited weights bit for bit."""
        base = self.log.base if self.log.edits else {}
        return SavedEdit(tensors=changes_since(self.lm.adapter, base), base=base)

    @classmethod
    def apply_saved(cls, lm: LoadedModel, config: Any, saved: SavedEdit,
                    objective: Objective | None = None) -> EditHandle:
        weights = {name: lm.adapter.parameter(name) for name in saved.tensors}
        wrong = [f"{n} {list(saved.tensors[n].shape)} for a weight {list(w.shape)}" for n, w in weights.items()
                 if saved.tensors[n].shape != w.shape]
        if wrong:  # added element by element, never broadcast
            raise ValueError(f"FT-M: a saved change does not have its weight's shape: {wrong[0]}")
        revert = snapshot(list(weights.values()))
        for name, weight in weights.items():
            add_change(weight, saved.tensors[name])
        return EditHandle(revert, first_layer=config.layer, stats=EditStats(), restores=tuple(weights.values()))

