"""MELO: one LoRA block per edit, switched on per sequence by a key lookup in a codebook of clusters.

After Yu et al. 2024, *MELO: Enhancing Model Editing with Neuron-Indexed Dynamic LoRA*, as the
reference toolkit implements it (docs/protocol.md (e)) and the OverTone paper ran it (Appendix B):

* **Blocks.** Every ``edit`` call adds its own LoRA adapter (rank ``rank``) on the ``roles`` modules of
  ``layers`` and trains only it, with Adam and a step decay (``lr_step``, ``lr_gamma``) on the objective
  (CE or OverTone). The adapters are peft LoRA adapters; peft's mixed-batch forward (``adapter_names``)
  applies a different adapter, or none (``__base__``), to each row of a batch.
* **Keys.** A sequence's key is the residual stream entering block ``key_layer`` at its last real
  token (the toolkit's ``key_id = -1``); under teacher forcing that is the answer's last token.
* **Codebook.** Clusters with a centre, a radius, a label (the edit's target) and their keys, each
  key pointing at the block of the edit that added it. An edit's key farther than ``radius +
  init_radius`` from the nearest cluster starts a new cluster of radius ``init_radius``; a nearer key
  with the same label joins that cluster (new centre = mean of its keys, radius grows to cover them);
  a nearer key with another label starts its own cluster and both radii become half their distance,
  dropping the old cluster's keys that fall outside (a conflict split).
* **Routing.** A sequence whose key lies inside the nearest cluster's radius gets the block of that
  cluster's nearest key; outside every radius it gets no LoRA at all, so its output is the base
  model's, bit for bit.

``first_layer`` is ``key_layer`` (at most the lowest LoRA layer): the key is read from that block's
input, so replaying the layers from it up recomputes both the key and the LoRA layers. Training
replays only those layers too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer, LoraModel
from torch import nn

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import (
    EditHandle,
    Editor,
    EditStats,
    SavedEdit,
    StepCallback,
    max_length_field,
    refuse_second_peft,
)
from overtone.editors.memory import Journal, edit_seed, resolve_preset
from overtone.editors.training import TargetLogits, default_stop, optimise, stop_when_clipped_field
from overtone.models.loading import LoadedModel
from overtone.models.replay import forward_hidden
from overtone.models.routing import last_token_index, real_tokens
from overtone.objectives import CrossEntropy, Objective, OverToneConfig
from overtone.tokens import encode_pairs

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch

# The reference toolkit ships MELO only for GPT2-XL: LoRA (2 ranks per edit, 350 blocks, so an
# effective output scale of 350 = alpha / rank) on c_fc of layers 36-37 of 48, keys from layer 35,
# Adam 1e-3, 50 steps. The Llama presets keep those values and that relative depth (0.75) with the
# OverTone paper's radii (Appendix B: 60 for Llama-2, 30 for Llama-3, for their key, which the paper
# does not name). The embedded model's radius is measured (docs/wise-melo.md).
_REFERENCE = dict(rank=2, alpha=700.0, lr=1e-3, steps=50)
PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(_REFERENCE, layers=(24, 25), init_radius=60.0),
    "llama-3-8b": dict(_REFERENCE, layers=(24, 25), init_radius=30.0),
    "smollm2-135m": dict(_REFERENCE, layers=(22, 23), init_radius=90.0, steps=25),
}
DEFAULT_RELATIVE_DEPTH = 36 / 48


@dataclass(frozen=True)
class MELOConfig:
    """MELO hyper-parameters; unset (None) fields come from the model's preset."""

    preset: str | None = field(default=None, metadata={"help": "llama-2-7b, llama-3-8b or smollm2-135m"})
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "layers that get LoRA blocks"})
    roles: tuple[str, ...] = field(default=("mlp_in",), metadata={"help": "module roles that get LoRA blocks"})
    key_layer: int | None = field(
        default=None, metadata={"help": "keys = residual stream entering this block (default: lowest LoRA layer)"})
    init_radius: float | None = field(default=None, metadata={"help": "radius of a new cluster (key units)"})
    rank: int | None = field(default=None, metadata={"help": "LoRA rank of one edit's block"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (output scale = alpha / rank)"})
    lr: float | None = field(default=None, metadata={"help": "Adam learning rate"})
    steps: int | None = field(default=None, metadata={"help": "optimisation steps per edit"})
    lr_step: int = field(default=20, metadata={"help": "decay the learning rate every this many steps"})
    lr_gamma: float = field(default=0.5, metadata={"help": "learning-rate decay factor"})
    stop_loss: float = field(default=0.0, metadata={"help": "stop once the objective's loss is below (0: never)"})
    stop_when_clipped: bool = stop_when_clipped_field()
    seed: int = field(default=0, metadata={"help": "seed of the LoRA initialisation"})
    max_length: int | None = max_length_field()

    def __post_init__(self) -> None:
        problems = []
        if self.steps is not None and self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if self.lr is not None and self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.rank is not None and self.rank < 1:
            problems.append(f"rank must be >= 1, got {self.rank}")
        if self.init_radius is not None and self.init_radius <= 0:
            problems.append(f"init_radius must be > 0, got {self.init_radius}")
        if self.layers is not None and not self.layers:
            problems.append("layers must name at least one layer")
        if not self.roles:
            problems.append("roles must name at least one module role")
        if problems:
            raise ValueError("MELO: " + "; ".join(problems))


def row_keys(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """MELO's keys [B, H] (fp32) from a block's inputs: each row's hidden state at its last real token."""
    hidden = args[0] if args else kwargs["hidden_states"]
    batch, length = hidden.shape[:2]
    last = last_token_index(real_tokens(block, args, kwargs), batch, length, hidden.device)
    return hidden[torch.arange(batch, device=hidden.device), last].detach().float()


@torch.no_grad()
def sequence_keys(lm: LoadedModel, key_layer: int, prompts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """The keys MELO computes at ``key_layer`` for ``prompt + " " + answer`` sequences (for measuring radii)."""
    batch = encode_pairs(lm.tokenizer, prompts, answers, lm.device)
    seen: list[torch.Tensor] = []
    hook = lm.adapter.layers[lm.adapter.check_layer(key_layer)].register_forward_pre_hook(
        lambda block, args, kwargs: seen.append(row_keys(block, args, kwargs)), with_kwargs=True)
    try:
        forward_hidden(lm.adapter, batch.input_ids, batch.attention_mask)
    finally:
        hook.remove()
    return seen[0]


@dataclass(frozen=True)
class Cluster:
    """One codebook entry. Immutable, so a snapshot of the codebook is a tuple of references."""

    center: torch.Tensor  # [H]
    radius: float
    label: str
    keys: torch.Tensor  # [P, H]
    blocks: tuple[str | None, ...]  # adapter of each key; None = no LoRA


class Codebook:
    """MELO's vector database: key clusters that map a sequence's key to an edit's LoRA block."""

    def __init__(self, init_radius: float) -> None:
        self.init_radius = init_radius
        self.clusters: tuple[Cluster, ...] = ()

    def nearest(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance [B] to the nearest cluster centre and that cluster's index [B]."""
        centers = torch.stack([c.center for c in self.clusters])
        return torch.cdist(keys, centers, compute_mode="donot_use_mm_for_euclid_dist").min(dim=-1)

    def route(self, keys: torch.Tensor) -> list[str | None]:
        """The block of each key [B, H]: its nearest cluster's nearest key, None outside every radius."""
        if not self.clusters:
            return [None] * keys.shape[0]
        distance, index = self.nearest(keys)
        blocks: list[str | None] = []
        for key, d, i in zip(keys, distance.tolist(), index.tolist(), strict=True):
            cluster = self.clusters[i]
            if d > cluster.radius:
                blocks.append(None)
            else:
                blocks.append(cluster.blocks[int((cluster.keys - key).norm(dim=-1).argmin())])
        return blocks

    def add(self, key: torch.Tensor, label: str, block: str) -> str:
        """File an edit's key; returns what happened: ``new``, ``joined`` or ``split``."""
        key = key.detach()
        fresh = Cluster(center=key, radius=self.init_radius, label=label, keys=key[None], blocks=(block,))
        if not self.clusters:
            self.clusters = (fresh,)
            return "new"
        distance, index = (t.item() for t in self.nearest(key[None]))
        near = self.clusters[index]
        clusters = list(self.clusters)
        if distance > near.radius + self.init_radius:
            clusters.append(fresh)
            outcome = "new"
        elif label == near.label:
            keys = torch.cat([near.keys, key[None]])
            center = keys.mean(dim=0)
            radius = max((keys - center).norm(dim=-1).max().item(), self.init_radius)
            clusters[index] = Cluster(center, radius, near.label, keys, (*near.blocks, block))
            outcome = "joined"
        else:
            radius = distance / 2 - 1e-5
            inside = (near.keys - near.center).norm(dim=-1) <= radius
            if bool(inside.any()):
                kept = Cluster(near.center, radius, near.label, near.keys[inside],
                               tuple(b for b, k in zip(near.blocks, inside.tolist(), strict=True) if k))
            else:
                kept = Cluster(near.center, radius, near.label, near.center[None], (None,))
            clusters[index] = kept
            clusters.append(replace(fresh, radius=distance / 2 + 1e-5))
            outcome = "split"
        self.clusters = tuple(clusters)
        return outcome


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
    # Chosen by `overtone sweep --editor melo --offset 1000 --limit 20` (ZsRE dev records 1000-1019) over
    # lambda {0.1, 0.5} x n {0.5, 1}, epsilon 0.01: lambda 0.1 ties for the best Avg., 86.50 vs CE 85.88
    # (paired +0.6 +- 1.3, within noise; one case gains Por.), with about 10 steps instead of 25. Lambda 0.5
    # lost a rephrase; n 0.5 and 1 gave the same metrics (docs/wise-melo.md).
    overtone_defaults = OverToneConfig(lam=0.1, n_sigma=1.0, epsilon=0.01)

    def __init__(self, lm: LoadedModel, config: MELOConfig | None = None, objective: Objective | None = None):
        config = resolve_preset(config or MELOConfig(), PRESETS, lm, "MELO", required=("init_radius",),
                                hint="The radius depends on the scale of the model's keys: measure it with "
                                     "benchmarks/melo_key_distances.py.")
        n = lm.adapter.num_layers
        if config.layers is None:
            first = min(n - 2, round(DEFAULT_RELATIVE_DEPTH * n)) if n > 1 else 0
            config = replace(config, layers=tuple(range(first, min(first + 2, n))))
        assert config.layers is not None
        config = replace(config, **{k: v for k, v in _REFERENCE.items() if getattr(config, k) is None})
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
            stats = optimise(cases, self.objective, TargetLogits(self.lm.adapter, batch, cfg.key_layer), update,
                             cfg.steps, default_stop(cfg.stop_loss, cfg.stop_when_clipped), on_step,
                             exact_steps=steps)
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
