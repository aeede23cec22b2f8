"""MEMIT: many facts at once, spread over several MLP layers (Meng et al., 2023, "Mass-Editing Memory
in a Transformer").

For a batch of facts and layers l_1 < ... < l_m:

* for each fact, the residual stream at the subject's last token after block l_m is given a target
  z = z0 + delta, optimised as ROME's value is (``locate.value``, with any ``Objective``); the facts'
  values are independent (each reads the model before the batch's update), so they are optimised
  together, ``value_batch`` facts per batched loop (``optimise_values``);
* then layer by layer, from the lowest: the keys K (one row per fact: the ``mlp_out`` input at the
  subject's last token, the mean over the bare prompt and the mean over its context-prefixed copies
  averaged, as the reference code does) and the present residual R = z - z_now at block l_m are read
  from the model as edited so far; the residual still missing is divided evenly over the layers
  left, R / (m - i), and solved for by least squares against the layer's second moment C:
  Delta = R^T K (lambda C + K^T K)^-1, lambda = ``mom2_update_weight``.

``edit(cases)`` with many cases is one batch update; repeated ``edit`` calls without ``revert`` are a
sequence of edits; ``revert`` restores every edited matrix bit for bit.

``edit_parallel(cases)`` is single editing of many cases at once: each case gets the update it gets
alone (one fact, so a rank-one update per layer), the values optimised in one batch and each layer's
keys read with every case's own lower-layer updates on its rows (``models.per_case.CaseLowRank``).
Batch editing (``--batch``) is the other protocol: one joint update for all cases, ``edit(cases)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import EditHandle, EditStats, SavedEdit, StepCallback, UpdateLog
from overtone.editors.locate import LocateConfig, context_prefixes, encode_rows, lookup_activations
from overtone.editors.locate.editor import LocateEditor
from overtone.editors.locate.update import add_update, apply_factors, factor_product, saved_factors, snapshot
from overtone.editors.locate.value import ValueResult, optimise_values
from overtone.editors.parallel import CaseEdits, CaseMemory, ModelShape
from overtone.editors.presets import editor_presets
from overtone.editors.rome import value_memory
from overtone.models.loading import LoadedModel
from overtone.models.per_case import CaseChange, CaseLowRank, CaseRows, patched
from overtone.objectives import Objective
from overtone.stats import SecondMoment, log_progress, second_moments

# The reference toolkit's MEMIT edits layers 4..8 of Llama-2-7B's 32 with lambda 15000; other models keep
# those relative depths and that lambda, unless editors/presets/memit.yaml names layers or a lambda for
# the model (by its name; the embedded model's lambda 1000 comes from ZsRE development cases, docs/locate.md).
REFERENCE_DEPTHS = (4 / 32, 8 / 32)
REFERENCE_UPDATE_WEIGHT = 15000.0


@dataclass(frozen=True)
class SpreadConfig(LocateConfig):
    """The settings of MEMIT's batch update that AlphaEdit shares (``spread_update``)."""

    # 16 facts x 7 prompt rows (MEMIT's 6 prompt variants and the KL prompt) keep a step's activations
    # small beside the model's weights, while a 100-fact batch still runs in 7 batched loops, not 100.
    value_batch: int = field(
        default=16, metadata={"help": "facts whose values are optimised together in one batched loop"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.value_batch < 1:
            raise ValueError(f"value_batch must be >= 1, got {self.value_batch}")


@dataclass(frozen=True)
class MEMITConfig(SpreadConfig):
    """MEMIT settings; defaults are the reference toolkit's for Llama-2-7B, except per-model layers and lambda."""

    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "edited layers (default: per model)"})
    mom2_update_weight: float | None = field(
        default=None, metadata={"help": "lambda, the weight of C against new keys (default: per model, else 15000)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:
            layers = tuple(sorted({int(x) for x in self.layers}))
            if not layers:
                raise ValueError("MEMIT needs at least one layer")
            object.__setattr__(self, "layers", layers)
        if self.mom2_update_weight is not None and self.mom2_update_weight < 0:
            raise ValueError(f"mom2_update_weight must be >= 0, got {self.mom2_update_weight}")


def _preset(lm: LoadedModel) -> Mapping[str, Any]:
    preset = editor_presets("memit", MEMITConfig).models.get(lm.name)
    return {} if preset is None else preset.settings


def default_layers(lm: LoadedModel) -> tuple[int, ...]:
    if "layers" in _preset(lm):
        return _preset(lm)["layers"]
    n = lm.adapter.num_layers
    low, high = (min(n - 1, round(d * n)) for d in REFERENCE_DEPTHS)
    return tuple(range(low, high + 1))


def default_update_weight(lm: LoadedModel) -> float:
    return _preset(lm).get("mom2_update_weight", REFERENCE_UPDATE_WEIGHT)


# solve(layer, keys [n, I], residual [n, H]) -> the factors (left [H, n], right [n, I]) of the layer's update
Solve = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# the unedited model's target logits of some cases at ``labels``, when captured (``Editor.reference_for``)
Reference = Callable[[Sequence[EditCase], torch.Tensor], torch.Tensor | None]


def case_keys(keys: torch.Tensor, n_cases: int, groups: Sequence[int]) -> torch.Tensor:
    """One key per case from its prompt variants' keys: the mean over each group of prefixes, then over groups."""
    per_case = keys.view(n_cases, sum(groups), -1)
    means = [chunk.mean(dim=1) for chunk in per_case.split(list(groups), dim=1)]
    return torch.stack(means).mean(dim=0)


def spread_update(lm: LoadedModel, cfg: SpreadConfig, layers: Sequence[int], objective: Objective,
                  prefixes: Sequence[str], groups: Sequence[int], cases: Sequence[EditCase], solve: Solve,
                  on_step: StepCallback | None = None, steps: int | None = None,
                  reference: Reference = lambda _cases, _labels: None,
                  ) -> tuple[EditStats, list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """MEMIT's batch update with the per-layer solve left to the caller (MEMIT, AlphaEdit).

    The value z of every case at the top layer's block output (``cfg.value_batch`` cases per batched
    optimisation, each as if alone), then for each layer from the lowest: the keys and the top block's
    output read from the model as edited so far, the residual still missing divided over the layers
    left, ``solve`` for the update's factors, added to the layer's ``mlp_out`` weight. Returns the edit's
    statistics (without its time; steps and losses of every case, in case order) and the factors per
    layer, in order.
    ``reference(cases, labels)``: the unedited model's target logits of those cases (``Editor.reference_for``).
    """
    adapter = lm.adapter
    top = layers[-1]
    values: list[ValueResult] = []
    for first in range(0, len(cases), cfg.value_batch):
        group = cases[first:first + cfg.value_batch]
        values += optimise_values(lm, group, adapter.layers[top], top, prefixes, objective, cfg, on_step,
                                  None if steps is None else [steps] * len(group),
                                  lambda labels, group=group: reference(group, labels))
    stats = EditStats()
    for value in values:
        stats.steps += value.stats.steps
        stats.losses += value.stats.losses
        stats.extra_losses += value.stats.extra_losses
        stats.add_activity(value.stats.activity)
    stops = [value.stats.stop_reason for value in values]
    z = torch.stack([value.target for value in values]).double()  # [n, H]
    rows = [row for case in cases for row in encode_rows(lm.tokenizer, case, prefixes, False, cfg.missing_subject)]
    updates = []
    for i, layer in enumerate(layers):
        module = adapter.module("mlp_out", layer)
        keys, outputs = lookup_activations(lm, rows, [(module, "in"), (adapter.layers[top], "out")], top)
        k = case_keys(keys, len(cases), groups).double()  # [n, I]
        now = outputs.view(len(cases), len(prefixes), -1)[:, 0].double()  # bare prompts
        residual = (z - now) / (len(layers) - i)
        left, right = solve(layer, k, residual)
        add_update(adapter, module.weight, factor_product(left, right))
        updates.append((layer, left, right))
    stats.stopped_early = all(r is not None for r in stops)
    stats.stop_reason = stops[0] if stats.stopped_early and len(set(stops)) == 1 else None
    return stats, updates


def solve_memory(shape: ModelShape, layers: int) -> int:
    """Bytes the edit holds whatever its cases: the ``layers`` layers' second moments in float32 (read at the
    first edit) and one solve's float64 matrices (lambda C + K K^T, its factor and the right-hand side's
    workspace, each intermediate x intermediate). 5.1 GiB at Llama-2-7B's five layers; the 7B rehearsal
    measured 5.8 to 6.1 GiB for the whole edit with the head's copy (docs/performance.md)."""
    return (4 * layers + 3 * 8) * shape.intermediate ** 2


def case_memory(shape: ModelShape, cfg: LocateConfig, layers: int, top: int) -> CaseMemory:
    """One case of a parallel MEMIT edit: its value optimisation at layer ``top``, then a rank-one update of
    each of ``layers`` layers, kept; shared by the window, the solve's memory (``solve_memory``)."""
    value = value_memory(shape, cfg, top)
    return CaseMemory(value.state + 4 * (shape.hidden + shape.intermediate) * layers, value.activations,
                      value.shared + solve_memory(shape, layers))


class SpreadEditor(LocateEditor):
    """What MEMIT and AlphaEdit set up alike from a resolved config: the edited layers checked, the objective
    of their values required, the context prefixes and their groups; ``key_moments`` reads the layers' key
    second moments, which each subclass turns into its solve's matrices (and does not keep)."""

    def __init__(self, lm: LoadedModel, config: SpreadConfig, objective: Objective | None) -> None:
        assert config.layers is not None
        for layer in config.layers:
            lm.adapter.check_layer(layer)
        label = type(self).__name__
        if objective is None:
            raise ValueError(f"{label} needs an objective for its values (e.g. overtone.objectives.CrossEntropy())")
        super().__init__(lm, config, objective)
        # Made once, from the model as it is now: later edits in a sequence do not change them.
        self.prefixes = context_prefixes(lm, config.context_lengths, config.context_seed)
        # groups of prefixes whose keys are averaged first: the bare prompt, then one group per length
        self.groups = [1] + [count for _, count in config.context_lengths if count > 0]

    def key_moments(self) -> dict[int, SecondMoment]:
        """E[k k^T] of the edited layers' keys (computed once per model and settings, then read from the cache)."""
        return second_moments(self.lm, self.config.layers, self.config.moment_spec(),
                              log_progress(f"{type(self).__name__} statistics"))


class MEMIT(SpreadEditor):
    name = "memit"
    config_class = MEMITConfig
    parallel_refusal = None

    def __init__(self, lm: LoadedModel, config: MEMITConfig | None = None, objective: Objective | None = None):
        config = config or MEMITConfig()
        if config.layers is None:
            config = replace(config, layers=default_layers(lm))
        if config.mom2_update_weight is None:
            config = replace(config, mom2_update_weight=default_update_weight(lm))
        super().__init__(lm, config, objective)
        moments = self.key_moments()
        # kept in float32 as stored (half of float64: 2.4 GiB at Llama-2-7B's 5 layers) and widened per solve,
        # exactly, one layer at a time
        self.mom2 = {layer: m.matrix.to(lm.device) for layer, m in moments.items()}
        self.mom2_info = {layer: {"tokens": m.tokens, "weights_sha256": m.key["weights_sha256"]}
                          for layer, m in moments.items()}
        self.log = UpdateLog()

    @property
    def first_layer(self) -> int:
        return self.config.layers[0]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "context_prefixes": list(self.prefixes), "mom2": self.mom2_info}

    def edit(self, cases: Sequence[EditCase], on_step: StepCallback | None = None,
             steps: int | None = None) -> EditHandle:
        cfg: MEMITConfig = self.config
        assert self.objective is not None and cfg.layers is not None
        start = time.perf_counter()
        adapter = self.lm.adapter
        modules = {layer: adapter.module("mlp_out", layer) for layer in cfg.layers}
        names = {layer: f"{adapter.path('mlp_out', layer)}.weight" for layer in cfg.layers}
        restore = snapshot([m.weight for m in modules.values()])
        mark = self.log.begin({names[layer]: m.weight for layer, m in modules.items()})

        def revert() -> None:
            restore()
            self.log.revert_to(mark)

        def solve(layer: int, k: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            system = self.weighted_moment(layer).add_(k.T @ k)
            # contiguous, so that re-applying the saved factors takes the very same matmul
            return residual.T.contiguous(), torch.linalg.solve(system, k.T).T.contiguous()  # [H, n], [n, I]

        try:
            stats, updates = spread_update(self.lm, cfg, cfg.layers, self.objective, self.prefixes, self.groups,
                                           cases, solve, on_step, steps,
                                           self.reference_for)
            for layer, left, right in updates:
                self.log.add((names[layer], left, right))
        except BaseException:
            revert()
            raise
        stats.time_s = time.perf_counter() - start
        return EditHandle(revert, first_layer=cfg.layers[0], stats=stats,
                          restores=tuple(m.weight for m in modules.values()))

    def weighted_moment(self, layer: int) -> torch.Tensor:
        """lambda C of ``layer`` in float64, the solve's precision."""
        return self.mom2[layer].double().mul_(self.config.mom2_update_weight)

    def case_memory(self) -> CaseMemory:
        cfg: MEMITConfig = self.config
        assert cfg.layers is not None
        return case_memory(ModelShape.of(self.lm.model.config, self.lm.dtype), cfg, len(cfg.layers), cfg.layers[-1])

    def edit_parallel(self, cases: Sequence[EditCase], on_step: StepCallback | None = None,
                      steps: Sequence[int | None] | None = None) -> CaseEdits:
        cfg: MEMITConfig = self.config
        assert self.objective is not None and cfg.layers is not None
        start = time.perf_counter()
        adapter = self.lm.adapter
        top = cfg.layers[-1]
        values = optimise_values(self.lm, cases, adapter.layers[top], top, self.prefixes, self.objective, cfg,
                                 on_step, steps, lambda labels: self.reference_for(cases, labels))
        z = torch.stack([v.target for v in values]).double()  # [cases, H]
        rows = [row for case in cases
                for row in encode_rows(self.lm.tokenizer, case, self.prefixes, False, cfg.missing_subject)]
        owners = CaseRows.consecutive([len(self.prefixes)] * len(cases))
        changes: dict[torch.nn.Module, CaseChange] = {}
        for i, layer in enumerate(cfg.layers):
            module = adapter.module("mlp_out", layer)
            with patched(changes, owners):  # each case's updates of the layers below, on its own rows
                keys, outputs = lookup_activations(self.lm, rows, [(module, "in"), (adapter.layers[top], "out")], top)
            k = case_keys(keys, len(cases), self.groups).double()  # [cases, I]
            now = outputs.view(len(cases), len(self.prefixes), -1)[:, 0].double()  # bare prompts
            residual = (z - now) / (len(cfg.layers) - i)
            # one fact per case: Delta = r (lambda C + k k^T)^-1 k, as the batch update of that case alone
            moment = self.weighted_moment(layer)
            solved = torch.stack([torch.linalg.solve(moment + k_i[:, None] @ k_i[None], k_i[:, None])[:, 0]
                                  for k_i in k])
            changes[module] = CaseLowRank(solved[:, None, :].float(), residual[:, :, None].float())
        stats = [v.stats for v in values]
        for s in stats:
            s.time_s = (time.perf_counter() - start) / len(cases)
        return CaseEdits(list(cases), stats, cfg.layers[0], changes)
    def saved_edit(self) -> SavedEdit:
        """The updates of the live edits, in order: per edit call and layer, factors [H, n] and [n, I]."""
        return saved_factors(self.lm, self.log)

    @classmethod
    def apply_saved(cls, lm: LoadedModel, config: MEMITConfig, saved: SavedEdit,
                    objective: Objective | None = None) -> EditHandle:
        assert config.layers is not None
        return apply_factors(lm, saved, first_layer=config.layers[0])
