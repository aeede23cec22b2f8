"""LoRA: low-rank adapters on attention projections, trained on the target tokens (built on peft).

The reference toolkit's LoRA editor (docs: protocol.md (d)): adapters on q_proj and v_proj of every
layer, rank 8, alpha 32, dropout 0.1, Adam lr 5e-3, 70 steps, loss on the target tokens of
``prompt + " " + target``; AdaLoRA is the variant its shipped config selects. Differences, on purpose:

* evaluation runs in eval mode (the reference evaluates with dropout on, so its post-edit metrics are
  random); adapter dropout is active only while training;
* AdaLoRA's orthogonality regulariser is added to the objective explicitly (the reference gets it
  implicitly from peft's forward) and recorded apart from the objective's loss; like the reference we
  do not run its rank allocation unless ``rank_allocation`` is set, so AdaLoRA here is the
  SVD-parametrised adapter at its initial rank (``init_rank``; ``rank``, its target, then has no
  effect and is refused);
* the objective is pluggable. The loop is the reference's: all ``steps`` updates (``stop_loss`` 0
  never stops on the loss). A stop rule, when one is set (``stop_loss`` > 0, ``stop_when_clipped``),
  is judged on an extra forward pass without dropout, so a lucky dropout mask cannot end training.

Single editing injects fresh adapters and removes them on revert, leaving the base weights bit-exact.
Continual editing keeps training the same adapters; reverting a later edit restores their values.

Randomness: every edit call has its own random generator, seeded from ``seed`` and the ids of its cases;
the adapters' initial values and every adapter-dropout mask are drawn from it, in a fixed order
(``_initial_factors``, ``models.per_case.dropout_noise``). So an edit does not depend on anything
else drawn from torch's global generator, and a case draws the same values alone and in a parallel edit.

Parallel editing (``edit_parallel``): one adapter per case without peft, the factors of all cases
stacked ([cases, r, in] and [cases, out, r] per adapted module) and applied row by row with the
formulas of peft's LoRA and AdaLoRA layers (``models.per_case.CaseLowRank``), each case with its own
generator, Adam state, AdaLoRA orthogonality term and stop. AdaLoRA's rank allocation is refused there.
"""

from __future__ import annotations

import copy
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

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
from overtone.editors.base import (
    EditError,
    EditHandle,
    Editor,
    EditStats,
    SavedEdit,
    StepCallback,
    max_length_field,
    refuse_second_peft,
)
from overtone.editors.parallel import (
    EDIT_TOKENS,
    TARGET_TOKENS,
    CaseEdits,
    CaseMemory,
    CaseParameters,
    ModelShape,
)
from overtone.editors.training import TargetLogits, default_stop, optimise, optimise_cases, stop_when_clipped_field
from overtone.models.loading import LoadedModel
from overtone.models.per_case import CaseChange, CaseDropout, CaseLowRank, dropout_noise, patched
from overtone.objectives import Objective, OverToneConfig
from overtone.tokens import encode_pairs

ADAPTER = "overtone"


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyper-parameters; defaults are the reference toolkit's for Llama-2-7B / Llama-3-8B."""

    # The reference toolkit's LoRA config selects AdaLoRA (init rank 12), and the paper used its defaults.
    variant: Literal["lora", "adalora"] = field(default="adalora", metadata={"help": "adalora or lora"})
    rank: int | None = field(
        default=None, metadata={"help": "LoRA rank (default 8); AdaLoRA: target rank of rank_allocation"})
    init_rank: int = field(default=12, metadata={"help": "AdaLoRA: initial rank"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA scaling numerator (scale = alpha / rank)"})
    dropout: float = field(default=0.1, metadata={"help": "adapter dropout while training"})
    target_roles: tuple[str, ...] | None = field(
        default=None, metadata={"help": "adapted roles (default attn_q, attn_v; attn_qkv for GPT-2)"}
    )
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "adapted layers (default: all)"})
    lr: float = field(default=5e-3, metadata={"help": "Adam learning rate"})
    steps: int = field(default=70, metadata={"help": "maximum optimisation steps"})
    stop_loss: float = field(default=0.0, metadata={"help": "stop when the objective's loss is below (0: never)"})
    stop_when_clipped: bool = stop_when_clipped_field()
    weight_decay: float = 0.0
    orth_reg_weight: float = field(default=0.5, metadata={"help": "AdaLoRA orthogonality regulariser weight"})
    rank_allocation: bool = field(
        default=False, metadata={"help": "AdaLoRA: run peft's rank allocation after each step (reference: never)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of adapter init and dropout (mixed with the case ids)"})
    max_length: int | None = max_length_field()

    def __post_init__(self) -> None:
        if self.variant not in ("lora", "adalora"):
            raise ValueError(f"LoRA variant must be 'lora' or 'adalora', got {self.variant!r}")
        if self.variant == "adalora" and self.rank is not None and not self.rank_allocation:
            raise ValueError(
                f"LoRA: rank={self.rank} has no effect on AdaLoRA without rank allocation (its adapters keep "
                "init_rank); set init_rank, or rank_allocation=true to allocate down to rank, or variant=lora"
            )
        if self.rank_value < 1 or self.init_rank < 1 or self.steps < 1 or self.lr <= 0:
            raise ValueError(f"LoRA needs rank >= 1, init_rank >= 1, steps >= 1 and lr > 0 "
                             f"(got {self.rank_value}, {self.init_rank}, {self.steps}, {self.lr})")

    @property
    def rank_value(self) -> int:
        """The LoRA rank, or AdaLoRA's target rank: 8 unless set."""
        return 8 if self.rank is None else self.rank


def orthogonality(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """AdaLoRA's regulariser: mean Frobenius distance of P P^T (A) and Q^T Q (B) from the identity over the
    adapters' (A, B) pairs; per case ([cases]) when the factors carry a leading case dimension."""
    terms = []
    for a, b in pairs:
        for cov in (a @ a.mT, b.mT @ b):
            eye = torch.eye(cov.size(-1), device=cov.device, dtype=cov.dtype)
            terms.append(torch.linalg.matrix_norm(cov - eye))
    return torch.stack(terms).mean(dim=0)


class _SeededDropout(nn.Module):
    """peft's adapter dropout with its masks drawn from the present edit's generator (``dropout_noise``)."""

    def __init__(self, p: float, generator: Callable[[], torch.Generator]) -> None:
        super().__init__()
        self.p = p
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x * dropout_noise(x.shape, self.p, self.generator(), x.dtype, x.device)


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
    return CaseMemory(20 * factors, shape.step_activations(1, EDIT_TOKENS, blocks, TARGET_TOKENS) + adapters)


class LoRA(Editor):
    name = "lora"
    config_class = LoRAConfig
    parallel_refusal = None
    # Chosen by `overtone sweep --editor lora --offset 1000 --limit 10` (ZsRE dev records 1000-1009) over
    # lambda {0.1, 0.5} x n {0.5, 1} x epsilon {0, 0.01}: the best Avg., 77.60 vs CE 76.12 (paired
    # +1.5 +- 5.2 on 10 cases, within noise), stopping after 16 steps instead of 70.
    overtone_defaults = OverToneConfig(lam=0.5, n_sigma=1.0, epsilon=0.01)

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

    def _seed(self, cases: Sequence[EditCase]) -> torch.Generator:
        """The random generator of an edit of ``cases``, seeded from the config's seed and the case ids."""
        seed = zlib.crc32(f"{self.config.seed}:{','.join(c.case_id for c in cases)}".encode())
        return torch.Generator(device=self.lm.device).manual_seed(seed)

    def _initial_factors(self, generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
        """Fresh adapter factors for every adapted module, drawn from ``generator`` in a fixed order, as peft's
        initialisations draw them: LoRA A ~ kaiming-uniform(a=sqrt 5), B = 0; AdaLoRA A, B ~ N(0, 0.02), E = 0."""
        cfg: LoRAConfig = self.config
        device = self.lm.device
        out = []
        for n_in, n_out in self._features:
            if cfg.variant == "adalora":
                a = torch.empty(cfg.init_rank, n_in, device=device).normal_(0.0, 0.02, generator=generator)
                b = torch.empty(n_out, cfg.init_rank, device=device).normal_(0.0, 0.02, generator=generator)
                out.append({"A": a, "B": b, "E": torch.zeros(cfg.init_rank, 1, device=device)})
            else:
                a = torch.empty(cfg.rank_value, n_in, device=device)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
                out.append({"A": a, "B": torch.zeros(n_out, cfg.rank_value, device=device)})
        return out

    def _create_adapters(self) -> None:
        """peft's adapters on the target modules, with this edit's initial values and seeded dropout."""
        cfg: LoRAConfig = self.config
        with torch.random.fork_rng(devices=[]):  # peft's own initialisation, overwritten below, draws globally
            self._peft = get_peft_model(self.lm.model, self._peft_config(), adapter_name=ADAPTER)
        self.lm.model.eval()  # peft creates its modules in training mode
        assert self._generator is not None
        with torch.no_grad():
            for path, factors in zip(self.target_modules, self._initial_factors(self._generator), strict=True):
                layer = self.lm.model.get_submodule(path)
                for name, value in factors.items():
                    held = getattr(layer, f"lora_{name}")[ADAPTER]
                    (held if isinstance(held, nn.Parameter) else held.weight).copy_(value)
                if cfg.dropout > 0:
                    layer.lora_dropout[ADAPTER] = _SeededDropout(cfg.dropout, self._present_generator)

    def _present_generator(self) -> torch.Generator:
        assert self._generator is not None, "adapter dropout outside an edit"
        return self._generator

    def _scaling(self) -> tuple[float, float | None]:
        """peft's scaling of the adapter term: alpha / r (LoRA), or alpha and the divisor rank + 1e-5 (AdaLoRA)."""
        cfg: LoRAConfig = self.config
        if cfg.variant == "adalora":
            return (cfg.alpha if cfg.alpha > 0 else float(cfg.init_rank)), cfg.init_rank + 1e-5
        return cfg.alpha / cfg.rank_value, None

    def edit(self, cases: Sequence[EditCase], on_step: StepCallback | None = None,
             steps: int | None = None) -> EditHandle:
        cfg: LoRAConfig = self.config
        assert self.objective is not None
        start = time.perf_counter()
        batch = encode_pairs(self.lm.tokenizer, [c.prompt for c in cases], [c.target for c in cases],
                             self.lm.device)
        created = self._peft is None
        self._generator = self._seed(cases)
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

        source = TargetLogits(self.lm.adapter, batch, self._first_layer)

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
        start = time.perf_counter()
        batch = encode_pairs(self.lm.tokenizer, [c.prompt for c in cases], [c.target for c in cases],
                             self.lm.device)
        generators = [self._seed([case]) for case in cases]
        initial = [self._initial_factors(g) for g in generators]  # per case, per adapted module
        params = CaseParameters({f"{i}.{name}": torch.stack([factors[i][name] for factors in initial])
                                 for i in range(len(self.target_modules)) for name in initial[0][i]},
                                cfg.lr, cfg.weight_decay)
        modules = [self.lm.model.get_submodule(path) for path in self.target_modules]
        scale, divisor = self._scaling()
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

        source = TargetLogits(self.lm.adapter, batch, self._first_layer,
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
        stats = optimise_cases(cases, self.objective, source, params, cfg.steps,
                               default_stop(cfg.stop_loss, cfg.stop_when_clipped), on_step,
                               extra_loss=regulariser if adalora else None,
                               check=without_dropout if stops and cfg.dropout > 0 else None, exact_steps=steps,
                               view=lambda p: patched(present([p]), None))
        for s in stats:
            s.time_s = (time.perf_counter() - start) / len(cases)
        return CaseEdits(list(cases), stats, self._first_layer, changes(params.finish(), None))

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
