"""The WISE editor: hooks that route each row of a batch to a side memory, and the training of an edit.

Every forward pass goes through two hooks: the block's pre-hook reads which tokens of each row are
real, the ``mlp_out`` module's hook replaces its output by the side memory a row routes to (or, while
training, by the weight being trained). An edit trains the open shard on the objective plus WISE's
margin loss, then records the shard's threshold and closes or merges shards (package docstring).
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from overtone.benchmarks.cases import EditCase
from overtone.benchmarks.irrelevant import DEFAULT_SOURCE, load_irrelevant
from overtone.benchmarks.knowedit import DatasetError
from overtone.editors.base import EditHandle, Editor, EditStats, SavedEdit, StepCallback
from overtone.editors.memory import Journal
from overtone.editors.presets import editor_presets, overtone_preset, resolve_preset
from overtone.editors.training import TargetLogits, optimise
from overtone.editors.wise.config import WISEConfig
from overtone.editors.wise.memory import Shard, State, activation, distance, project, ties_merge
from overtone.models.loading import LoadedModel
from overtone.models.replay import forward_hidden
from overtone.models.routing import real_tokens
from overtone.objectives import CrossEntropy, Objective, ObjectiveOutput
from overtone.tokens import encode_pairs

log = logging.getLogger(__name__)

# A model without a preset edits the reference's relative depth: layer 27 of Llama-2-7B's 32.
DEFAULT_RELATIVE_DEPTH = 27 / 32


def _round(values: list[float]) -> list[float]:
    return [round(v, 3) for v in values]


class WISE(Editor):
    name = "wise"
    config_class = WISEConfig
    # One routed side memory (per-shard thresholds, masks, merges) holds every edit: see docs/parallel.md.
    parallel_refusal = ("its edits live in one routed side memory, so cases edited side by side would capture "
                        "each other's rows (docs/parallel.md)")
    needs_routing = True
    overtone_defaults = overtone_preset("wise", WISEConfig)  # chosen on ZsRE dev records: presets/wise.yaml

    def __init__(self, lm: LoadedModel, config: WISEConfig | None = None, objective: Objective | None = None):
        # The margins and thresholds are in units of the model's activations: a preset of another model
        # size would be wrong silently, so without a matching preset they must be given.
        config = resolve_preset(config or WISEConfig(), editor_presets("wise", WISEConfig), lm, "WISE",
                                required=("lr", "steps", "alpha", "beta", "gamma", "act_ratio"))
        if config.layer is None:
            n = lm.adapter.num_layers
            config = replace(config, layer=min(n - 1, round(DEFAULT_RELATIVE_DEPTH * n)))
        assert config.layer is not None
        lm.adapter.check_layer(config.layer)
        if objective is None:
            raise ValueError("WISE needs an objective (e.g. overtone.objectives.CrossEntropy())")
        super().__init__(lm, config, objective)
        self.module = lm.adapter.module("mlp_out", config.layer)
        self.block = lm.adapter.layers[config.layer]
        self.conv1d = lm.adapter.arch.conv1d
        self.act = activation(lm.model.config)
        self.sentences = load_irrelevant(config.irrelevant)
        self.state = State()
        self.journal: Journal[State] = Journal()
        self.last_routes: torch.Tensor | None = None  # shard index per row of the last routed batch, -1 = none
        self._hooks: list[Any] = []
        self._real: torch.Tensor | None = None  # real tokens of the batch now inside the block
        self._mode = "route"
        self._trained: torch.Tensor | None = None  # the weight being trained, in "train" mode
        self._inner: torch.Tensor | None = None  # the FFN input of the last pass in "train"/"record" mode

    @property
    def first_layer(self) -> int:
        return self.config.layer

    # --- the side-memory forward -------------------------------------------------------------------

    def _project(self, inner: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return project(inner, weight, self.module.bias, self.conv1d)

    def _distance(self, side: torch.Tensor, original: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        return distance(self.act, side, original, real)

    def _threshold(self, shard: Shard) -> float:
        return shard.min_act * self.config.act_ratio * self.config.threshold_scale

    def _block_hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._real = real_tokens(self.block, args, kwargs)

    def _module_hook(self, _module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        inner = inputs[0]
        if self._mode != "route":
            self._inner = inner.detach()
            if self._mode == "record":
                return output
            assert self._trained is not None
            return self._project(inner, self._trained).to(output.dtype)
        real = self._real
        if real is not None and real.shape != inner.shape[:2]:
            real = None  # the FFN was called outside its block: score every token
        best = torch.full((inner.shape[0],), -1, dtype=torch.long, device=inner.device)
        best_distance = torch.full((inner.shape[0],), -math.inf, device=inner.device)
        sides: dict[int, torch.Tensor] = {}
        for index, shard in enumerate(self.state.shards):
            if shard.edits == 0:
                continue
            side = self._project(inner, shard.weight)
            distance = self._distance(side, output, real)
            wins = (distance > self._threshold(shard)) & (distance > best_distance)
            if bool(wins.any()):
                sides[index] = side
                best = torch.where(wins, index, best)
                best_distance = torch.where(wins, distance, best_distance)
        self.last_routes = best
        if not sides:
            return output
        routed = output.clone()
        for index, side in sides.items():
            rows = best == index
            routed[rows] = side[rows].to(output.dtype)
        return routed

    def _install(self) -> None:
        if not self._hooks:
            self._hooks = [
                self.block.register_forward_pre_hook(self._block_hook, with_kwargs=True),
                self.module.register_forward_hook(self._module_hook),
            ]

    def _restore(self, state: State) -> None:
        self.state = state
        if not state.shards:
            for hook in self._hooks:
                hook.remove()
            self._hooks = []

    # --- editing -----------------------------------------------------------------------------------

    def _open_shard(self) -> Shard:
        """The shard this edit writes to: the last one if still open, else a new copy of W with a new mask."""
        shards = self.state.shards
        if shards and not shards[-1].closed:
            return shards[-1]
        original = self.module.weight.detach().float()
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.state.opened)
        mask = (torch.rand(original.shape, generator=generator) < self.config.mask_ratio).to(original.device)
        shard = Shard(weight=original.clone(), mask=mask)
        self.state = State((*shards, shard), self.state.opened + 1, self.state.unmerged)
        return shard

    def _close_and_merge(self) -> None:
        """Close the open shard every ``save_freq`` edits; merge the closed ones every ``merge_freq``."""
        cfg: WISEConfig = self.config
        state = self.state
        shard = state.shards[-1]
        if shard.edits < cfg.save_freq:
            return
        shards = (*state.shards[:-1], replace(shard, closed=True, mask=None))
        unmerged = state.unmerged + 1
        group = cfg.merge_freq // cfg.save_freq
        if unmerged >= group:
            parts = shards[-group:]
            base = self.module.weight.detach().float()
            merged = Shard(weight=ties_merge(base, [p.weight for p in parts], cfg.density),
                           min_act=min(p.min_act for p in parts), edits=sum(p.edits for p in parts), closed=True)
            shards = (*shards[:-group], merged)
            unmerged = 0
            log.info("WISE: merged %d shards with TIES (%d memories now)", group, len(shards))
        self.state = State(shards, state.opened, unmerged)

    def _irrelevant_for(self, cases: Sequence[EditCase]) -> list[str]:
        """One irrelevant sentence per case, chosen by the case id so that it never depends on run order."""
        return [self.sentences[zlib.crc32(c.case_id.encode()) % len(self.sentences)] for c in cases]

    def _inner_inputs(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The FFN inputs [n, T, I] at the side-memory layer and the attention mask [n, T] of ``texts``."""
        enc = self.lm.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right").to(self.lm.device)
        self._mode, self._inner = "record", None
        try:
            with torch.no_grad():
                forward_hidden(self.lm.adapter, enc["input_ids"], enc["attention_mask"])
            assert self._inner is not None
            return self._inner, enc["attention_mask"].bool()
        finally:
            self._mode, self._inner = "route", None

    def edit(self, cases: Sequence[EditCase], on_step: StepCallback | None = None,
             steps: int | None = None) -> EditHandle:
        cfg: WISEConfig = self.config
        objective = self.objective
        assert objective is not None
        start = time.perf_counter()
        ids = ", ".join(c.case_id for c in cases)
        batch = encode_pairs(self.lm.tokenizer, [c.prompt for c in cases], [c.target for c in cases],
                             self.lm.device)
        before = self.state
        self._install()
        try:
            shard = self._open_shard()
            loc_inner, loc_real = self._inner_inputs(self._irrelevant_for(cases))
            original = self.module.weight.detach().float()
            loc_original = self._project(loc_inner, original)
            edit_real = batch.attention_mask.bool()
            assert shard.mask is not None
            mask = shard.mask.to(original.dtype)
            weight = shard.weight.clone().requires_grad_(True)
            optimiser = torch.optim.SGD([weight], lr=cfg.lr, weight_decay=cfg.weight_decay)
            self._mode, self._trained = "train", weight
            last: dict[str, Any] = {}

            def margin_loss() -> torch.Tensor:
                """WISE's activation margins, from the FFN input the forward pass just recorded."""
                assert self._inner is not None
                d_in = self._distance(self._project(self._inner, weight), self._project(self._inner, original),
                                      edit_real)
                d_out = self._distance(self._project(loc_inner, weight), loc_original, loc_real)
                margin = (F.relu(d_out - d_in + cfg.gamma) + F.relu(d_out - cfg.alpha)
                          + F.relu(cfg.beta - d_in)).mean()
                last.update(margin=margin.item(), d_in=d_in.tolist(), d_out=d_out.tolist())
                return margin

            def stop(loss: float, margin: float | None, out: ObjectiveOutput) -> str | None:
                """The reference's early stop: objective + margin loss small and settled. It reads the sum on
                purpose (the margins are WISE's routing condition, and the reference decides on the sum);
                optionally also stop once no gradient is left (every token clipped, every margin met)."""
                total = loss + (margin or 0.0)
                settled = total <= cfg.stop_loss and abs(last.get("previous", math.inf) - total) <= 1e-4
                last["previous"] = total
                if settled:
                    return "settled"
                if cfg.stop_when_clipped and out.active_tokens == 0 and margin == 0:
                    return "clipped"
                return None

            def update(loss: torch.Tensor) -> None:
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                assert weight.grad is not None
                weight.grad.mul_(mask)
                optimiser.step()
                with torch.no_grad():
                    weight.copy_(torch.clamp(weight, original - cfg.norm_constraint, original + cfg.norm_constraint))

            stats = optimise(cases, objective, TargetLogits(self.lm.adapter, batch, cfg.layer,
                                                               reference=self.reference_for(cases, batch.labels)),
                             update, cfg.steps,
                             stop, on_step, extra_loss=margin_loss, exact_steps=steps)
            weight = weight.detach()
            assert self._inner is not None
            with torch.no_grad():
                d_in = self._distance(self._project(self._inner, weight), self._project(self._inner, original),
                                      edit_real)
            trained = replace(shard, weight=weight, min_act=min(shard.min_act, d_in.min().item()),
                              edits=shard.edits + len(cases))
            self.state = replace(self.state, shards=(*self.state.shards[:-1], trained))
            log.debug("WISE %s: %d steps, last step: margin %.4f, d_in %s, d_out %s; final d_in %s, threshold %.3f",
                      ids, stats.steps, last["margin"], _round(last["d_in"]), _round(last["d_out"]),
                      _round(d_in.tolist()), self._threshold(trained))
            self._close_and_merge()
        except BaseException:
            self._restore(before)
            raise
        finally:
            self._mode, self._trained, self._inner = "route", None, None
        stats.time_s = time.perf_counter() - start
        return self.journal.handle(before, self._restore, cfg.layer, stats)

    def saved_edit(self) -> SavedEdit:
        """The side memories (fp32 copies of the matrix), the open shard's gradient mask and the routing state."""
        tensors: dict[str, torch.Tensor] = {}
        shards = []
        for i, shard in enumerate(self.state.shards):
            tensors[f"shard.{i}.weight"] = shard.weight
            if shard.mask is not None:
                tensors[f"shard.{i}.mask"] = shard.mask
            shards.append({"min_act": None if math.isinf(shard.min_act) else shard.min_act, "edits": shard.edits,
                           "closed": shard.closed})
        state = {"shards": shards, "opened": self.state.opened, "unmerged": self.state.unmerged}
        base = {f"{self.lm.adapter.path('mlp_out', self.config.layer)}.weight": self.module.weight} if shards else {}
        return SavedEdit(tensors=tensors, state=state, base=base)

    @classmethod
    def apply_saved(cls, lm: LoadedModel, config: WISEConfig, saved: SavedEdit,
                    objective: Objective | None = None) -> EditHandle:
        """A WISE editor on ``lm`` holding the saved side memories; it routes every forward pass until reverted.

        The irrelevant sentences only train further edits: when the saved source is not available here,
        the shipped default stands in.
        """
        try:
            load_irrelevant(config.irrelevant)
        except DatasetError:
            log.warning("WISE: irrelevant sentences %r not found; using %s for further edits",
                        config.irrelevant, DEFAULT_SOURCE)
            config = replace(config, irrelevant=DEFAULT_SOURCE)
        editor = cls(lm, config, objective or CrossEntropy())
        device = editor.module.weight.device
        shards = []
        for i, info in enumerate(saved.state["shards"]):
            mask = saved.tensors.get(f"shard.{i}.mask")
            shards.append(Shard(weight=saved.tensors[f"shard.{i}.weight"].to(device, torch.float32),
                                min_act=math.inf if info["min_act"] is None else info["min_act"],
                                edits=info["edits"], closed=info["closed"],
                                mask=None if mask is None else mask.to(device)))
        before = editor.state
        editor._install()
        editor.state = State(tuple(shards), saved.state["opened"], saved.state["unmerged"])
        return editor.journal.handle(before, editor._restore, editor.config.layer, EditStats())
