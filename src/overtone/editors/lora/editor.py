"""The LoRA editor and its one-edit-at-a-time path, on peft's adapters.

Single editing injects fresh peft adapters (initial values and dropout masks from the edit's own
generator, ``factors``) and removes them on revert, leaving the base weights bit-exact. Continual
editing keeps training the same adapters; reverting a later edit restores their values. Saving writes
a peft adapter folder. ``edit_parallel`` hands over to ``per_case``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import torch
from peft import (
    AdaLoraConfig,
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from torch import nn

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import EditError, EditHandle, Editor, EditStats, SavedEdit, StepCallback, refuse_second_peft
from overtone.editors.lora.config import LoRAConfig
from overtone.editors.lora.factors import edit_generator, initial_factors, orthogonality
from overtone.editors.lora.per_case import case_memory, edit_cases
from overtone.editors.parallel import CaseEdits, CaseMemory, ModelShape
from overtone.editors.presets import overtone_preset
from overtone.editors.training import TargetLogits, default_stop, optimise
from overtone.models.loading import LoadedModel
from overtone.models.per_case import dropout_noise
from overtone.objectives import Objective
from overtone.tokens import encode_pairs

ADAPTER = "overtone"


class SeededDropout(nn.Module):
    """peft's adapter dropout with its masks drawn from the present edit's generator (``dropout_noise``)."""

    def __init__(self, p: float, generator: Callable[[], torch.Generator]) -> None:
        super().__init__()
        self.p = p
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x * dropout_noise(x.shape, self.p, self.generator(), x.dtype, x.device)


class LoRA(Editor):
    name = "lora"
    config_class = LoRAConfig
    parallel_refusal = None
    overtone_defaults = overtone_preset("lora", LoRAConfig)  # chosen on ZsRE dev records: presets/lora.yaml

    def __init__(self, lm: LoadedModel, config: LoRAConfig | None = None, objective: Objective | None = None):
        config = config or LoRAConfig()
        if objective is None:
            raise ValueError("LoRA needs an objective (e.g. overtone.objectives.CrossEntropy())")
        super().__init__(lm, config, objective)
        adapter = lm.adapter
        roles = config.target_roles or (
            ("attn_q", "attn_v") if "attn_q" in adapter.arch.roles else ("attn_qkv",)
        )
        layers = config.layers if config.layers is not None else tuple(range(adapter.num_layers))
        self.target_modules = [adapter.path(role, layer) for layer in layers for role in roles]
        # (in, out) features of every adapted module, in the nn.Linear orientation whatever the weight's layout
        self._features = []
        for layer in layers:
            for role in roles:
                n_in = adapter.in_features(role, layer)
                self._features.append((n_in, adapter.weight(role, layer).numel() // n_in))
        self._first_layer = min(layers)
        self._peft: PeftModel | None = None
        self._generator: torch.Generator | None = None  # the present edit's (see the module docstring)

    @property
    def first_layer(self) -> int:
        return self._first_layer

    def _peft_config(self) -> LoraConfig:
        cfg: LoRAConfig = self.config
        common = dict(r=cfg.rank_value, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=self.target_modules, bias="none")
        if cfg.variant == "adalora":
            del common["r"]  # AdaLoRA sizes its adapters by init_r
            return AdaLoraConfig(**common, init_r=cfg.init_rank, target_r=cfg.rank_value,
                                 total_step=cfg.steps, orth_reg_weight=cfg.orth_reg_weight)
        return LoraConfig(**common)

    def _adapter_parameters(self) -> list[nn.Parameter]:
        assert self._peft is not None
        return [p for n, p in self._peft.named_parameters() if "lora_" in n and ADAPTER in n]

    def _create_adapters(self) -> None:
        """peft's adapters on the target modules, with this edit's initial values and seeded dropout."""
        cfg: LoRAConfig = self.config
        with torch.random.fork_rng(devices=[]):  # peft's own initialisation, overwritten below, draws globally
            self._peft = get_peft_model(self.lm.model, self._peft_config(), adapter_name=ADAPTER)
        self.lm.model.eval()  # peft creates its modules in training mode
        assert self._generator is not None
        initial = initial_factors(cfg, self._features, self._generator, self.lm.device)
        with torch.no_grad():
            for path, factors in zip(self.target_modules, initial, strict=True):
                layer = self.lm.model.get_submodule(path)
                for name, value in factors.items():
                    held = getattr(layer, f"lora_{name}")[ADAPTER]
                    (held if isinstance(held, nn.Parameter) else held.weight).copy_(value)
                if cfg.dropout > 0:
                    layer.lora_dropout[ADAPTER] = SeededDropout(cfg.dropout, self._present_generator)

    def _present_generator(self) -> torch.Generator:
        assert self._generator is not None, "adapter dropout outside an edit"
        return self._generator

    def edit(self, cases: Sequence[EditCase], on_step: StepCallback | None = None,
             steps: int | None = None) -> EditHandle:
        cfg: LoRAConfig = self.config
        assert self.objective is not None
        start = time.perf_counter()
        batch = encode_pairs(self.lm.tokenizer, [c.prompt for c in cases], [c.target for c in cases],
                             self.lm.device)
        created = self._peft is None
        self._generator = edit_generator(cfg, cases, self.lm.device)
        if created:
            self._create_adapters()
        assert self._peft is not None
        params = self._adapter_parameters()
        snapshot = [p.detach().clone() for p in params]
        dropouts = [m for n, m in self._peft.named_modules() if "lora_dropout" in n]
        optimiser = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        tuner = self._peft.base_model
        extra = None
        if cfg.variant == "adalora":
            layers = [self.lm.model.get_submodule(path) for path in self.target_modules]
            pairs = [(layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]) for layer in layers]
            extra = lambda: cfg.orth_reg_weight * orthogonality(pairs)  # noqa: E731

        step = 0

        def update(loss: torch.Tensor) -> None:
            nonlocal step
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if cfg.variant == "adalora" and cfg.rank_allocation:
                tuner.update_and_allocate(step)  # uses this step's gradients, so before zero_grad
            step += 1

        source = TargetLogits(self.lm.adapter, batch, self._first_layer,
                              reference=self.reference_for(cases, batch.labels))

        def without_dropout() -> torch.Tensor:
            """The logits of the current adapters with dropout off: what a stop decision reads."""
            for m in dropouts:
                m.eval()
            try:
                return source()
            finally:
                for m in dropouts:
                    m.train()

        stops = cfg.stop_loss > 0 or cfg.stop_when_clipped
        check = without_dropout if stops and cfg.dropout > 0 else None
        for p in params:
            p.requires_grad_(True)
        for m in dropouts:
            m.train()
        try:
            stats = optimise(cases, self.objective, source, update, cfg.steps,
                             default_stop(cfg.stop_loss, cfg.stop_when_clipped), on_step, extra_loss=extra,
                             check=check, exact_steps=steps)
        except BaseException:
            self._restore(created, params, snapshot)
            raise
        finally:
            for m in dropouts:
                m.eval()
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        stats.time_s = time.perf_counter() - start
        return EditHandle(lambda: self._restore(created, params, snapshot), first_layer=self._first_layer,
                          stats=stats)

    def _restore(self, created: bool, params: list[nn.Parameter], snapshot: list[torch.Tensor]) -> None:
        """Undo one edit: remove the adapters it created, or put back the adapter values it started from."""
        if created:
            if self._peft is not None:
                self._peft.unload()
                self._peft = None
            return
        with torch.no_grad():
            for p, value in zip(params, snapshot, strict=True):
                p.copy_(value)

    def case_memory(self) -> CaseMemory:
        shape = ModelShape.of(self.lm.model.config, self.lm.dtype)
        return case_memory(shape, self.config, self._features, self.lm.adapter.num_layers - self._first_layer)

    def edit_parallel(self, cases: Sequence[EditCase], on_step: StepCallback | None = None,
                      steps: Sequence[int | None] | None = None) -> CaseEdits:
        cfg: LoRAConfig = self.config
        assert self.objective is not None
        if cfg.variant == "adalora" and cfg.rank_allocation:
            raise EditError("LoRA: --parallel needs AdaLoRA without rank_allocation (peft's allocator prunes one "
                            "adapter set by its own budget schedule)")
        if self._peft is not None:
            raise EditError("LoRA: a parallel edit starts from the unedited model; revert the earlier edits first")
        return edit_cases(self.lm, cfg, self.objective, self.target_modules, self._features, self._first_layer,
                          cases, on_step, steps)

    def saved_edit(self) -> SavedEdit:
        """The adapters as peft saves them, so that the artifact folder is a peft adapter folder."""
        if self._peft is None:
            return SavedEdit(tensors={})
        config = copy.deepcopy(self._peft.peft_config[ADAPTER])
        config.inference_mode = True
        base = {f"{path}.weight": self.lm.adapter.parameter(f"{path}.weight") for path in self.target_modules}
        return SavedEdit(tensors=get_peft_model_state_dict(self._peft, adapter_name=ADAPTER), base=base,
                         peft_config=config)

    @classmethod
    def apply_saved(cls, lm: LoadedModel, config: LoRAConfig, saved: SavedEdit,
                    objective: Objective | None = None) -> EditHandle:
        """Wrap the model with peft again and load the adapters; reverting unloads peft (the base weights
        were never touched)."""
        refuse_second_peft(lm, cls.name)
        peft_config = copy.deepcopy(saved.peft_config)
        peft_config.base_model_name_or_path = None  # peft fills in this model's own
        with torch.random.fork_rng(devices=[]):  # peft initialises the adapters before their values are loaded
            model = get_peft_model(lm.model, peft_config, adapter_name=ADAPTER)
        lm.model.eval()
        loaded = set_peft_model_state_dict(model, saved.tensors, adapter_name=ADAPTER)
        if loaded.unexpected_keys or any("lora_" in key for key in loaded.missing_keys):
            model.unload()
            missing = [k for k in loaded.missing_keys if "lora_" in k]
            raise ValueError(f"the saved LoRA adapter does not fit this model (unexpected keys: "
                             f"{loaded.unexpected_keys[:3]}, missing: {missing[:3]})")

        def revert() -> None:
            model.unload()

        layers = config.layers if config.layers is not None else (0,)
        return EditHandle(revert, first_layer=min(layers), stats=EditStats())
