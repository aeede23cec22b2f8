"""UltraEdit: one forward and backward pass per batch of facts, then a closed-form update per module (Gu et al.,
2025, "UltraEdit: Training-, Subject-, and Memory-Free Lifelong Editing in Large Language Models").

No optimisation loop and no corpus statistics, so a stream of thousands of facts costs about one
training step per batch. For a batch of facts:

* one batched forward pass of ``prompt + " " + target`` and one backward pass of the editing
  objective (any ``Objective``: CE as the reference; OverTone, whose reference logits are this very
  pass's); at each edited linear module, the input k (key) and the gradient g of the loss with
  respect to the module's output are recorded at the positions that predict target tokens;
* lifelong normalisation: the running count, mean and sum of squared deviations of the features
  z = [k, g] over the whole stream take in the batch's features (one exact parallel-variance merge),
  and every feature is standardised with them, z^ = (z - mean) / (std + eps);
* the module's pseudo-values V = -lr |k^|^2 g^ (one row per target position) and its update, the
  ridge regression of V on the raw keys K: X = (K^T K + ridge I)^-1 K^T V, W += X^T.

As in the reference code, modules whose weights have the same shape share one normaliser (the
Llama-3 reference edits gate_proj and up_proj, so all its modules share one), and the ridge system
uses the raw keys while only the pseudo-values use the normalised features (docs/lifelong.md). The
running statistics are the stream's state (``editors/stream.py``): ``revert`` restores them with the
weights, a saved edit carries them, a new editor on a model carrying live edits continues them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import (
    EditError,
    EditHandle,
    Editor,
    EditStats,
    SavedEdit,
    StepCallback,
    config_problems,
    max_length_field,
)
from overtone.editors.locate.update import add_update
from overtone.editors.presets import editor_presets, overtone_preset, resolve_preset
from overtone.editors.reports import StepInfo
from overtone.editors.stream import Stream, model_stream
from overtone.models.adapters import ROLES
from overtone.models.loading import LoadedModel
from overtone.objectives import Objective, ObjectiveOutput
from overtone.tokens import encode_pairs, plan_batches

# A model without a preset edits the reference's modules at its relative depths: gate_proj of layers 11..15
# and up_proj of layers 18..24 of Llama-3-8B's 32.
REFERENCE_MODULES = (("mlp_gate", 11 / 32, 15 / 32), ("mlp_in", 18 / 32, 24 / 32))
EPS = torch.finfo(torch.float32).eps  # the reference's epsilon of the standardisation (float32 features)
# Padded tokens per forward group of ``UltraEdit.features``: small groups of similar lengths waste little on
# padding, and on a CPU a group of a few hundred tokens already keeps the matrix products efficient.
PASS_TOKENS = 512


def parse_module(spec: str) -> tuple[str, int]:
    """``"mlp_gate.11"`` -> ("mlp_gate", 11): a role of ``models.adapters`` and a layer."""
    role, _, layer = spec.rpartition(".")
    if role not in ROLES or not layer.isdigit():
        raise ValueError(f"module {spec!r}: expected ROLE.LAYER with ROLE one of {', '.join(ROLES)}, e.g. mlp_gate.11")
    return role, int(layer)


@dataclass(frozen=True)
class UltraEditConfig:
    """UltraEdit settings; per-model modules and lr come from ``editors/presets/ultraedit.yaml``."""

    modules: tuple[str, ...] | None = field(
        default=None, metadata={"help": "edited linear modules as ROLE.LAYER, e.g. mlp_gate.11,mlp_in.18 "
                                        "(default: per model)"})
    lr: float | None = field(default=None, metadata={"help": "scale of the pseudo-values -lr |k^|^2 g^ (the "
                                                             "reference's lr; default: per model)"})
    ridge: float = field(default=1.0, metadata={"help": "weight of the identity in K^T K + ridge I"})
    preset: str | None = field(default=None, metadata={"help": "preset name (default: the model's by shape)"})
    max_length: int | None = max_length_field()

    def __post_init__(self) -> None:
        if self.modules is not None:
            modules = tuple(dict.fromkeys(str(m) for m in self.modules))
            if not modules:
                raise ValueError("UltraEdit needs at least one module")
            for spec in modules:
                parse_module(spec)
            object.__setattr__(self, "modules", modules)
        config_problems("UltraEdit", [f"ridge must be > 0, got {self.ridge}"] if self.ridge <= 0 else [], lr=self.lr)


def default_modules(n_layers: int) -> tuple[str, ...]:
    return tuple(f"{role}.{layer}" for role, low, high in REFERENCE_MODULES
                 for layer in range(round(low * n_layers), min(n_layers - 1, round(high * n_layers)) + 1))


def _shape(weight: nn.Parameter, in_features: int) -> str:
    """The normaliser's key: ``<in>x<out>`` of a weight."""
    return f"{in_features}x{weight.numel() // in_features}"


def _stream(lm: LoadedModel, modules: Sequence[str]) -> Stream:
    """The model's UltraEdit stream over these modules: per weight shape S, ``count.S`` (a 0-dim tensor),
    ``mean.S`` and ``m2.S`` [in + out] of the features seen so far, float64, zero at first."""
    names, shapes = [], {}
    for spec in modules:
        role, layer = parse_module(spec)
        names.append(f"{lm.adapter.path(role, layer)}.weight")
        width = lm.adapter.in_features(role, layer)
        weight = lm.adapter.weight(role, layer)
        shapes[_shape(weight, width)] = width + weight.numel() // width

    def zeros() -> dict[str, torch.Tensor]:
        state = {}
        for shape, size in shapes.items():
            state[f"count.{shape}"] = torch.zeros((), dtype=torch.float64, device=lm.device)
            state[f"mean.{shape}"] = torch.zeros(size, dtype=torch.float64, device=lm.device)
            state[f"m2.{shape}"] = torch.zeros(size, dtype=torch.float64, device=lm.device)
        return state

    return model_stream(lm, "ultraedit", names, zeros)


@torch.no_grad()
def merge_statistics(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, features: torch.Tensor) -> None:
    """Take the rows of ``features`` into the running count, mean and sum of squared deviations, in place
    (Chan et al.'s parallel merge: exact whatever the batch sizes)."""
    b = features.size(0)
    total = count + b
    batch_mean = features.mean(dim=0)
    delta = batch_mean - mean
    m2.add_(((features - batch_mean) ** 2).sum(dim=0) + delta**2 * count * b / total)
    mean.add_(delta * b / total)
    count.copy_(total)


def standardise(features: torch.Tensor, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """(z - mean) / (std + eps) with the unbiased std of the running statistics."""
    std = (m2 / (count - 1).clamp_min(1)).sqrt()
    return (features - mean) / (std + EPS)


def ridge_update(keys: torch.Tensor, grads: torch.Tensor, normalised: torch.Tensor, lr: float,
                 ridge: float) -> torch.Tensor:
    """The update [out, in] of one module: X^T with X = (K^T K + ridge I)^-1 K^T V, V = -lr |k^|^2 g^.

    ``keys`` K [N, in] and ``grads`` [N, out] are the raw features (float64), ``normalised`` [N, in + out]
    their standardised concatenation.
    """
    k_hat, g_hat = normalised.split([keys.size(1), grads.size(1)], dim=1)
    values = -lr * (k_hat * k_hat).sum(dim=1, keepdim=True) * g_hat
    system = keys.T @ keys
    system.diagonal().add_(ridge)
    return torch.linalg.solve(system, keys.T @ values).T


class UltraEdit(Editor):
    name = "ultraedit"
    config_class = UltraEditConfig
    parallel_refusal = ("a batch's update and the running statistics every later batch is normalised with "
                        "are one step of the stream, so its cases cannot be edited side by side")
    overtone_defaults = overtone_preset("ultraedit", UltraEditConfig)

    def __init__(self, lm: LoadedModel, config: UltraEditConfig | None = None, objective: Objective | None = None):
        config = resolve_preset(config or UltraEditConfig(), editor_presets("ultraedit", UltraEditConfig), lm,
                                "UltraEdit")
        if config.modules is None:
            config = replace(config, modules=default_modules(lm.adapter.num_layers))
        assert config.modules is not None and config.lr is not None
        self.sites = [parse_module(spec) for spec in config.modules]
        self.modules = [lm.adapter.module(role, layer) for role, layer in self.sites]  # clear error for a bad site
        if objective is None:
            raise ValueError("UltraEdit needs an objective (e.g. overtone.objectives.CrossEntropy())")
        super().__init__(lm, config, objective)
        self.names = [f"{lm.adapter.path(role, layer)}.weight" for role, layer in self.sites]
        self.shapes = [_shape(m.weight, lm.adapter.in_features(role, layer))
                       for m, (role, layer) in zip(self.modules, self.sites, strict=True)]
        self.stream = _stream(lm, config.modules)

    @property
    def first_layer(self) -> int:
        return min(layer for _, layer in self.sites)

    def reset(self) -> None:
        """Start a new stream: zero the running statistics (the weights keep their edits)."""
        self.stream.reset()

    def edit(self, cases: Sequence[EditCase], on_step: StepCallback | None = None,
             steps: int | None = None) -> EditHandle:
        """One update of every edited module from one forward and backward pass over ``cases``.

        ``steps``, the matched-steps control, can only be 1: UltraEdit makes one update per batch.
        """
        if steps not in (None, 1):
            raise ValueError(f"UltraEdit makes one update per batch; it cannot take exactly {steps} steps")
        weights = {name: module.weight for name, module in zip(self.names, self.modules, strict=True)}

        def change() -> EditStats:
            start = time.perf_counter()
            keys, grads, out = self.features(cases, on_step)
            state = self.stream.state
            for shape in dict.fromkeys(self.shapes):
                rows = torch.cat([torch.cat([k, g], dim=1) for k, g, s in zip(keys, grads, self.shapes, strict=True)
                                  if s == shape])
                merge_statistics(state[f"count.{shape}"], state[f"mean.{shape}"], state[f"m2.{shape}"], rows)
            for module, k, g, shape in zip(self.modules, keys, grads, self.shapes, strict=True):
                normalised = standardise(torch.cat([k, g], dim=1), state[f"count.{shape}"], state[f"mean.{shape}"],
                                         state[f"m2.{shape}"])
                update = ridge_update(k, g, normalised, self.config.lr, self.config.ridge)
                add_update(self.lm.adapter, module.weight, update)
            stats = EditStats(steps=1, losses=[out.loss.item()], time_s=time.perf_counter() - start)
            stats.count(out)
            return stats

        return self.stream.edit(weights, self.first_layer, change)

    def features(self, cases: Sequence[EditCase], on_step: StepCallback | None = None
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], ObjectiveOutput]:
        """Per edited module, the keys [N, in] and output gradients [N, out] (float64) at the N positions that
        predict the cases' target tokens, from one forward and backward pass; and the objective's output.

        The forward runs in groups of rows of similar length (``PASS_TOKENS``), each cut to its longest
        row, so the pass spends little on padding (about 45% of a length-blind grid of 100 CounterFact
        facts); the vocabulary head and the objective then see all rows at once, in case order, so the
        loss, its gradients and ``on_step`` are those of one batch up to float rounding.
        """
        assert self.objective is not None
        batch = encode_pairs(self.lm.tokenizer, [c.prompt for c in cases], [c.target for c in cases], self.lm.device)
        lengths = batch.attention_mask.sum(dim=1).tolist()
        groups = plan_batches([range(n) for n in lengths], PASS_TOKENS)
        inputs: list[list[torch.Tensor]] = [[] for _ in self.modules]  # per module, per group
        outputs: list[list[torch.Tensor]] = [[] for _ in self.modules]

        def record(i: int):
            def hook(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
                inputs[i].append(args[0].detach())
                if not output.requires_grad:  # the lowest edited module: the graph starts here
                    output = output.detach().requires_grad_()
                outputs[i].append(output)
                return output

            return hook

        def at_targets(per_group: list[torch.Tensor]) -> torch.Tensor:
            """[B, T, D] of per-group [rows, length, D] tensors at the target-predicting positions, in case order."""
            picked = [x[torch.arange(len(g), device=x.device)[:, None], batch.positions[g]]
                      for x, g in zip(per_group, groups, strict=True)]
            return torch.cat(picked)[restore]

        restore = torch.argsort(torch.tensor([i for g in groups for i in g], device=batch.positions.device))
        handles = [m.register_forward_hook(record(i)) for i, m in enumerate(self.modules)]
        try:
            with torch.enable_grad():
                hidden = []
                for group in groups:
                    length = max(lengths[i] for i in group)
                    hidden.append(self.lm.model.base_model(input_ids=batch.input_ids[group, :length],
                                                           attention_mask=batch.attention_mask[group, :length],
                                                           use_cache=False)[0])
                logits = self.lm.adapter.logits(at_targets(hidden), fp32=True)
                # a static target's prior: the unedited model's logits when captured before a sequence, else these
                reference = self.reference_for(cases, batch.labels)
                if reference is None and self.objective.needs_reference:
                    reference = logits.detach()
                out = self.objective(logits, batch.labels, reference)
                if not torch.isfinite(out.loss):
                    raise EditError(f"UltraEdit: the objective's loss is {out.loss.item()} on cases "
                                    f"{', '.join(c.case_id for c in cases)}; nothing was changed")
                flat = torch.autograd.grad(out.loss, [o for per_group in outputs for o in per_group])
        finally:
            for h in handles:
                h.remove()
        if on_step is not None:
            on_step(StepInfo(step=0, loss=out.loss.item(), output=out, cases=cases, logits=logits.detach(),
                             labels=batch.labels))
        mask = batch.label_mask
        keys = [at_targets(x)[mask].double() for x in inputs]
        grads = [at_targets(list(flat[i * len(groups):(i + 1) * len(groups)]))[mask].double()
                 for i in range(len(self.modules))]
        return keys, grads, out

    def saved_edit(self) -> SavedEdit:
        """The change of every edited matrix since the stream's first live edit, and the running statistics."""
        return self.stream.saved(self.lm)

    @classmethod
    def apply_saved(cls, lm: LoadedModel, config: UltraEditConfig, saved: SavedEdit,
                    objective: Objective | None = None) -> EditHandle:
        """The saved weights and statistics on ``lm``: a new UltraEdit editor on ``lm`` continues the stream."""
        assert config.modules is not None
        first = min(layer for _, layer in map(parse_module, config.modules))
        return _stream(lm, config.modules).apply(lm, saved, first)
