"""The MELO editor: one peft LoRA block per edit, applied per row as the codebook routes it.

A pre-hook on block ``key_layer`` reads each row's key; while an edit trains it files the edit's keys
in the codebook and sends every row to the new block, otherwise it asks the codebook. Pre-hooks on
the LoRA layers hand peft's mixed-batch forward (``adapter_names``) each row's block, or ``__base__``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer, LoraModel
from torch import nn

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import EditHandle, Editor, EditStats, SavedEdit, StepCallback, refuse_second_peft
from overtone.editors.melo.codebook import Cluster, Codebook, row_keys
from overtone.editors.melo.config import MELOConfig
from overtone.editors.memory import Journal, edit_seed
from overtone.editors.presets import editor_presets, overtone_preset, resolve_preset
from overtone.editors.training import TargetLogits, default_stop, optimise
from overtone.models.loading import LoadedModel
from overtone.objectives import CrossEntropy, Objective
from overtone.tokens import encode_pairs

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch

# A model without a preset gets LoRA layers at the reference's relative depth: layer 36 of GPT2-XL's 48.
DEFAULT_RELATIVE_DEPTH = 36 / 48


@dataclass(frozen=True)
class _State:
    clusters: tuple[Cluster, ...]
    adapters: tuple[str, ...]


class MELO(Editor):
    name = "melo"
    config_class = MELOConfig
    # One codebook of LoRA blocks, keyed by cluster radius, holds every edit: see docs/parallel.md.
    parallel_refusal = ("its edits live in one routed codebook of LoRA blocks, so cases edited side by side would "
                        "capture each other's rows (docs/parallel.md)")
    needs_routing = True
    overtone_defaults = overtone_preset("melo", MELOConfig)  # chosen on ZsRE dev records: presets/melo.yaml

    def __init__(self, lm: LoadedModel, config: MELOConfig | None = None, objective: Objective | None = None):
        config = resolve_preset(config or MELOConfig(), editor_presets("melo", MELOConfig), lm, "MELO",
                                required=("init_radius",),
                                hint="The radius depends on the scale of the model's keys: measure it with "
                                     "benchmarks/melo_key_distances.py.")
        n = lm.adapter.num_layers
        if config.layers is None:
            first = min(n - 2, round(DEFAULT_RELATIVE_DEPTH * n)) if n > 1 else 0
            config = replace(config, layers=tuple(range(first, min(first + 2, n))))
        assert config.layers is not None
        if config.key_layer is None:
            config = replace(config, key_layer=min(config.layers))
        for layer in (*config.layers, config.key_layer):
            lm.adapter.check_layer(layer)
        if config.key_layer > min(config.layers):
            raise ValueError(f"MELO: key_layer {config.key_layer} must not be above the lowest LoRA layer "
                             f"{min(config.layers)}: the key decides which block those layers apply")
        self.targets = [lm.adapter.path(role, layer) for layer in config.layers for role in config.roles]
        if objective is None:
            raise ValueError("MELO needs an objective (e.g. overtone.objectives.CrossEntropy())")
        super().__init__(lm, config, objective)
        assert config.init_radius is not None
        self.codebook = Codebook(config.init_radius)
        self.adapters: tuple[str, ...] = ()
        self.journal: Journal[_State] = Journal()
        self.last_routes: list[str | None] = []  # block of each row of the last routed batch
        self._tuner: LoraModel | None = None
        self._hooks: list[Any] = []
        self._route: list[str] = []
        self._training: str | None = None  # the block being trained: every row uses it
        self._filing: list[tuple[str, str]] = []  # (case id, label) of the keys the next training forward files
        self._created = 0

    @property
    def first_layer(self) -> int:
        return self.config.key_layer

    # --- routing -----------------------------------------------------------------------------------

    def _key_hook(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        keys = row_keys(block, args, kwargs)
        if self._training is not None:
            if self._filing:
                outcomes = [self.codebook.add(key, label, self._training)
                            for key, (_, label) in zip(keys, self._filing, strict=True)]
                log.debug("MELO %s: keys filed as %s (%d clusters)", ", ".join(i for i, _ in self._filing),
                          outcomes, len(self.codebook.clusters))
                self._filing = []
            self._route = [self._training] * keys.shape[0]
            return
        self.last_routes = self.codebook.route(keys)
        self._route = [BASE if b is None else b for b in self.last_routes]

    def _lora_hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        x = args[0] if args else kwargs["x"]
        route = self._route if len(self._route) == x.shape[0] else [BASE] * x.shape[0]
        return args, {**kwargs, "adapter_names": route}

    def _lora_layers(self) -> list[LoraLayer]:
        return [self.lm.model.get_submodule(path) for path in self.targets]

    def _add_adapter(self, name: str, seed: int) -> list[nn.Parameter]:
        """Inject LoRA adapter ``name`` (peft's default init: Kaiming A, zero B) and return its fp32 parameters."""
        cfg: MELOConfig = self.config
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(self.targets), lora_dropout=0.0,
                          fan_in_fan_out=self.lm.adapter.arch.conv1d, bias="none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self._tuner is None:
                self._tuner = LoraModel(self.lm.model, lora, adapter_name=name)
                self._hooks = [self.lm.adapter.layers[cfg.key_layer].register_forward_pre_hook(
                    self._key_hook, with_kwargs=True)]
                self._hooks += [layer.register_forward_pre_hook(self._lora_hook, with_kwargs=True)
                                for layer in self._lora_layers()]
            else:
                self._tuner.peft_config[name] = lora
                self._tuner.inject_adapter(self.lm.model, name)
        params = []
        for layer in self._lora_layers():
            for part in (layer.lora_A[name], layer.lora_B[name]):
                part.float()  # trained in fp32 whatever the model's dtype; peft casts around it
                params += list(part.parameters())
        for p in self.lm.model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        return params

    def _restore(self, state: _State) -> None:
        """Return to ``state``: drop the adapters added since, and peft altogether when none is left."""
        self.codebook.clusters = state.clusters
        if self._tuner is not None:
            if not state.adapters:
                self._tuner.unload()
                for hook in self._hooks:
                    hook.remove()
                self._tuner, self._hooks = None, []
            else:
                for name in list(self._tuner.peft_config):
                    if name not in state.adapters:
                        self._tuner.delete_adapter(name)
        self.adapters = state.adapters
        for p in self.lm.model.parameters():
            p.requires_grad_(False)

    # --- editing -----------------------------------------------------------------------------------

    def edit(self, cases: Sequence[EditCase], on_step: StepCallback | None = None,
             steps: int | None = None) -> EditHandle:
        cfg: MELOConfig = self.config
        assert self.objective is not None
        start = time.perf_counter()
        batch = encode_pairs(self.lm.tokenizer, [c.prompt for c in cases], [c.target for c in cases],
                             self.lm.device)
        before = _State(self.codebook.clusters, self.adapters)
        self._created += 1
        name = f"edit{self._created}"
        try:
            params = self._add_adapter(name, edit_seed(cfg.seed, cases))
            self.adapters = (*self.adapters, name)
            optimiser = torch.optim.Adam(params, lr=cfg.lr)
            schedule = torch.optim.lr_scheduler.StepLR(optimiser, step_size=cfg.lr_step, gamma=cfg.lr_gamma)

            def update(loss: torch.Tensor) -> None:
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()

            # The first forward files the edit's keys (the key hook sees them); every row trains the new block,
            # which starts at zero (B = 0), so the first logits are the unedited model's.
            self._training, self._filing = name, [(case.case_id, case.target.strip()) for case in cases]
            source = TargetLogits(self.lm.adapter, batch, cfg.key_layer,
                                  reference=self.reference_for(cases, batch.labels))
            stats = optimise(cases, self.objective, source, update, cfg.steps,
                             default_stop(cfg.stop_loss, cfg.stop_when_clipped), on_step, exact_steps=steps)
        except BaseException:
            self._training = None
            self._restore(before)
            raise
        finally:
            self._training, self._filing = None, []
            for p in self.lm.model.parameters():
                p.requires_grad_(False)
        stats.time_s = time.perf_counter() - start
        return self.journal.handle(before, self._restore, cfg.key_layer, stats)

    def saved_edit(self) -> SavedEdit:
        """Every live edit's LoRA block and the codebook that routes sequences to them."""
        tensors: dict[str, torch.Tensor] = {}
        for name in self.adapters:
            for path, layer in zip(self.targets, self._lora_layers(), strict=True):
                tensors[f"block.{name}.{path}.lora_A"] = layer.lora_A[name].weight
                tensors[f"block.{name}.{path}.lora_B"] = layer.lora_B[name].weight
        clusters = []
        for j, cluster in enumerate(self.codebook.clusters):
            tensors[f"cluster.{j}.center"], tensors[f"cluster.{j}.keys"] = cluster.center, cluster.keys
            clusters.append({"radius": cluster.radius, "label": cluster.label, "blocks": list(cluster.blocks)})
        state = {"adapters": list(self.adapters), "clusters": clusters, "created": self._created}
        base = {f"{path}.weight": self.lm.adapter.parameter(f"{path}.weight") for path in self.targets}
        return SavedEdit(tensors=tensors, state=state, base=base if self.adapters else {})

    @classmethod
    def apply_saved(cls, lm: LoadedModel, config: MELOConfig, saved: SavedEdit,
                    objective: Objective | None = None) -> EditHandle:
        """A MELO editor on ``lm`` holding the saved blocks and codebook; it routes until reverted."""
        refuse_second_peft(lm, cls.name)
        editor = cls(lm, config, objective or CrossEntropy())
        empty = _State((), ())
        names = tuple(saved.state["adapters"])
        try:
            with torch.no_grad():
                for name in names:
                    editor._add_adapter(name, seed=0)
                    for path, layer in zip(editor.targets, editor._lora_layers(), strict=True):
                        layer.lora_A[name].weight.copy_(saved.tensors[f"block.{name}.{path}.lora_A"])
                        layer.lora_B[name].weight.copy_(saved.tensors[f"block.{name}.{path}.lora_B"])
        except BaseException:
            editor._restore(empty)
            raise
        for p in lm.model.parameters():
            p.requires_grad_(False)
        device = lm.device
        editor.adapters, editor._created = names, saved.state["created"]
        editor.codebook.clusters = tuple(
            Cluster(center=saved.tensors[f"cluster.{j}.center"].to(device), radius=info["radius"],
                    label=info["label"], keys=saved.tensors[f"cluster.{j}.keys"].to(device),
                    blocks=tuple(info["blocks"]))
            for j, info in enumerate(saved.state["clusters"]))
        return editor.journal.handle(empty, editor._restore, editor.config.key_layer, EditStats())
