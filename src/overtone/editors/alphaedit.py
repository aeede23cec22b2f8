"""AlphaEdit: MEMIT's batch update projected onto the null space of preserved knowledge (Fang et al., ICLR
2025, "AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models").

MEMIT weighs new keys against the second moment C of the keys a layer already serves; that only
discourages change on preserved keys. AlphaEdit removes it: the update is confined to the directions
those keys barely use, so preserved keys keep their outputs exactly, and earlier batches of a stream
are kept by adding their keys to the system. Per batch of facts and layers l_1 < ... < l_m:

* values, keys and the residual spread over the layers are MEMIT's (``memit.spread_update``): v* per
  fact optimised with any ``Objective`` (CE is the reference's NLL; KL and weight decay as MEMIT's);
* P = U0 U0^T, U0 the eigenvectors of the layer's cached C = E[k k^T] (``overtone.stats``) whose
  eigenvalues fall below ``nullspace_threshold``; made once per model, layer, statistics and
  threshold, kept in memory for the model's life;
* with K [n, I] the batch's keys, R [n, H] the residual and ``cache_c`` the sum of K^T K over the
  stream's earlier batches: Delta = R^T K P ((K^T K + cache_c) P + L2 I)^-1. The reference code
  solves the transposed system (P (K^T K + cache_c) + L2 I) X = P K^T R and adds X^T; here the same
  system is solved with K^T on the right (n columns instead of H) and Delta = R^T X^T, the same
  matrix. Since P (M P + L2 I)^-1 = (P M + L2 I)^-1 P, Delta k = 0 for every k with P k = 0;
* after the batch, every layer's keys are read again from the edited model and K^T K is added to
  ``cache_c``, as in the reference code.

``cache_c`` is the stream's state (``editors/stream.py``): consecutive ``edit`` calls accumulate it,
``revert`` restores it with the weights, a saved edit carries it, ``reset`` zeroes it.
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import EditHandle, EditStats, SavedEdit, StepCallback
from overtone.editors.locate import encode_rows, lookup_activations
from overtone.editors.memit import SpreadConfig, SpreadEditor, case_keys, spread_update
from overtone.editors.presets import editor_presets, resolve_preset
from overtone.editors.stream import Stream, model_stream
from overtone.models.loading import LoadedModel
from overtone.objectives import Objective
from overtone.stats import SecondMoment

# A model without a preset edits the reference's relative depths, layers 4..8 of Llama-3-8B's 32.
REFERENCE_DEPTHS = (4 / 32, 8 / 32)


@dataclass(frozen=True)
class AlphaEditConfig(SpreadConfig):
    """AlphaEdit settings; defaults are the reference's for Llama-3-8B (``editors/presets/alphaedit.yaml``).

    The value-optimisation fields keep ``LocateConfig``'s meaning; their defaults here are AlphaEdit's
    (v_weight_decay 0.5, clamp_norm_factor 0.75; 25 passes = 24 updates, docs/locate.md); ``lr`` comes from the
    model's preset, else the preset file's fallback (the reference's v_lr 0.1).
    """

    lr: float | None = field(default=None, metadata={
        "help": "Adam learning rate of the value optimisation (v_lr; default: per model, else the reference's 0.1)"})
    weight_decay: float = field(default=0.5, metadata={"help": "weight of |delta| / |v0|^2 (v_weight_decay)"})
    clamp_norm_factor: float = field(default=0.75, metadata={"help": "|delta| <= clamp_norm_factor * |v0|"})
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "edited layers (default: per model)"})
    nullspace_threshold: float = field(
        default=2e-2, metadata={"help": "eigenvalues of C below this span the null space the update may use"})
    l2: float = field(default=1.0, metadata={"help": "weight of the identity in the solve (L2)"})
    preset: str | None = field(default=None, metadata={"help": "preset name (default: the model's by shape)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:
            layers = tuple(sorted({int(x) for x in self.layers}))
            if not layers:
                raise ValueError("AlphaEdit needs at least one layer")
            object.__setattr__(self, "layers", layers)
        if self.nullspace_threshold <= 0 or self.l2 < 0:
            raise ValueError(f"nullspace_threshold must be > 0 and l2 >= 0, got {self.nullspace_threshold} and "
                             f"{self.l2}")


# model -> (layer, statistics key, threshold) -> P, float64 on the model's device
_PROJECTIONS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, str, float], torch.Tensor]] = \
    weakref.WeakKeyDictionary()


def null_space_projection(lm: LoadedModel, moment: SecondMoment, threshold: float) -> torch.Tensor:
    """P = U0 U0^T over the eigenvectors of C with eigenvalues below ``threshold``; computed once per model,
    layer, statistics and threshold (an eigendecomposition of C in float64), then read from memory."""
    key = (moment.layer, json.dumps(moment.key, sort_keys=True), float(threshold))
    per_model = _PROJECTIONS.setdefault(lm.model, {})
    if key not in per_model:
        values, vectors = torch.linalg.eigh(moment.matrix.to(lm.device, torch.float64))
        null = vectors[:, values < threshold]
        per_model[key] = null @ null.T
    return per_model[key]


def alphaedit_factors(projection: torch.Tensor, cache: torch.Tensor, keys: torch.Tensor, residual: torch.Tensor,
                      l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (left [H, n], right [n, I]) of Delta = R^T K P ((K^T K + cache) P + l2 I)^-1, in float64.

    ``keys`` K [n, I], ``residual`` R [n, H], ``projection`` P and ``cache`` [I, I]. ``right`` = X^T with
    (P (K^T K + cache) + l2 I) X = P K^T: the transpose of the system the reference code solves.
    """
    system = projection @ (keys.T @ keys + cache)
    system.diagonal().add_(l2)
    right = torch.linalg.solve(system, projection @ keys.T).T
    return residual.T.contiguous(), right.contiguous()


def _weight_names(lm: LoadedModel, layers: Sequence[int]) -> list[str]:
    return [f"{lm.adapter.path('mlp_out', layer)}.weight" for layer in layers]


def _stream(lm: LoadedModel, layers: Sequence[int]) -> Stream:
    """The model's AlphaEdit stream at these layers: ``cache_c.<layer>`` [I, I] float64, zero at first."""

    def zeros() -> dict[str, torch.Tensor]:
        return {f"cache_c.{layer}": torch.zeros(lm.adapter.in_features("mlp_out", layer),
                                                lm.adapter.in_features("mlp_out", layer),
                                                dtype=torch.float64, device=lm.device) for layer in layers}

    return model_stream(lm, "alphaedit", _weight_names(lm, layers), zeros)


class AlphaEdit(SpreadEditor):
    name = "alphaedit"
    config_class = AlphaEditConfig
    parallel_refusal = ("a batch is one joint update whose keys every later batch of the stream builds on "
                        "(cache_c), so its cases cannot be edited side by side")

    def __init__(self, lm: LoadedModel, config: AlphaEditConfig | None = None, objective: Objective | None = None):
        config = resolve_preset(config or AlphaEditConfig(), editor_presets("alphaedit", AlphaEditConfig), lm,
                                "AlphaEdit")
        if config.layers is None:
            n = lm.adapter.num_layers
            low, high = (min(n - 1, round(d * n)) for d in REFERENCE_DEPTHS)
            config = replace(config, layers=tuple(range(low, high + 1)))
        super().__init__(lm, config, objective)
        moments = self.key_moments()
        self.projection = {layer: null_space_projection(lm, m, config.nullspace_threshold)
                           for layer, m in moments.items()}
        self.mom2_info = {layer: {"tokens": m.tokens, "weights_sha256": m.key["weights_sha256"],
                                  "null_space_dim": int(torch.trace(self.projection[layer]).round())}
                          for layer, m in moments.items()}
        self.stream = _stream(lm, config.layers)

    @property
    def first_layer(self) -> int:
        return self.config.layers[0]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "context_prefixes": list(self.prefixes), "mom2": self.mom2_info}

    def reset(self) -> None:
        """Start a new stream: zero ``cache_c`` (the weights keep their edits)."""
        self.stream.reset()

    def edit(self, cases: Sequence[EditCase], on_step: StepCallback | None = None,
             steps: int | None = None) -> EditHandle:
        """One joint update of ``cases`` (a batch of the stream), then their keys join ``cache_c``."""
        cfg: AlphaEditConfig = self.config
        assert self.objective is not None and cfg.layers is not None
        adapter = self.lm.adapter
        modules = {layer: adapter.module("mlp_out", layer) for layer in cfg.layers}
        weights = dict(zip(_weight_names(self.lm, cfg.layers), (m.weight for m in modules.values()), strict=True))
        cache = self.stream.state

        def solve(layer: int, k: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return alphaedit_factors(self.projection[layer], cache[f"cache_c.{layer}"], k, residual, cfg.l2)

        def change() -> EditStats:
            start = time.perf_counter()
            assert self.objective is not None
            stats, _ = spread_update(self.lm, cfg, cfg.layers, self.objective, self.prefixes, self.groups, cases,
                                     solve, on_step, steps, self.reference_for)
            rows = [row for case in cases
                    for row in encode_rows(self.lm.tokenizer, case, self.prefixes, False, cfg.missing_subject)]
            keys = lookup_activations(self.lm, rows, [(modules[layer], "in") for layer in cfg.layers],
                                      cfg.layers[-1])
            with torch.no_grad():
                for layer, layer_keys in zip(cfg.layers, keys, strict=True):
                    k = case_keys(layer_keys, len(cases), self.groups).double()
                    cache[f"cache_c.{layer}"].add_(k.T @ k)
            stats.time_s = time.perf_counter() - start
            return stats

        return self.stream.edit(weights, cfg.layers[0], change)

    def saved_edit(self) -> SavedEdit:
        """The change of every edited matrix since the stream's first live edit, and ``cache_c`` per layer."""
        return self.stream.saved(self.lm)

    @classmethod
    def apply_saved(cls, lm: LoadedModel, config: AlphaEditConfig, saved: SavedEdit,
                    objective: Objective | None = None) -> EditHandle:
        """The saved weights and ``cache_c`` on ``lm``: a new AlphaEdit editor on ``lm`` continues the stream."""
        assert config.layers is not None
        return _stream(lm, config.layers).apply(lm, saved, config.layers[0])
