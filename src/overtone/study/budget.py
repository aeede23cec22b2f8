"""The budget of a study on a named GPU: GPU-hours of editing and of evaluation, computed before renting one.

For every cell of a study (``overtone study plan FILE --profile llama-2-7b --gpu h100``):

* **cases at once** (B): the cell's ``--parallel``; ``auto`` is the runner's rule (half the memory left
  beside the weights, over ``Editor.case_memory``'s bytes per case, at most 64) on the device's memory;
* **editing**: per optimisation step, the FLOPs of a forward and a backward pass of the edit's rows through
  the blocks the editor trains through (a frozen block's backward is its input gradients: as many FLOPs as
  its forward; a trained matrix adds its weight gradient), plus the logits of the scored tokens, and the
  bytes of those blocks' weights, read once per step of a window of B cases; a step takes the longer of
  the two at the device's peaks (a roofline); steps per edit are the editor's maximum (its config and
  presets: an upper bound, an edit that stops early takes fewer); MEMIT adds its fp64 solves;
* **evaluation**: the teacher-forced probes are a forward pass on the unedited model and one from the
  edit's first layer on the edited one; ``wild`` generates every probe's reply twice (before and after),
  a prefill of the prompt and ``reply`` decode steps, each reading the weights once per window;
* time = the ideal time at the device's datasheet peaks over the efficiency measured on a real machine
  (``profiles.yaml``: ``benchmarks/rehearsal_7b.py`` on a CPU), or the rates given (``--rate``).

Tokens come from the dataset files (words x ``tokens.per_word``; the rehearsal counts with a tokenizer).
Every assumption is printed beside the estimate (``Budget.assumptions``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import yaml

from overtone.benchmarks.cases import EditCase

if TYPE_CHECKING:
    from overtone.editors.parallel import CaseMemory

AUTO_SHARE, AUTO_MAX = 0.5, 64  # editors/parallel.py's --parallel auto (tests/test_budget.py checks they agree)
KL_ROWS = 1  # ROME and MEMIT: the KL prompt's row beside the prompt variants
LOCATE_TAIL = 16  # ROME/MEMIT: tokens of a prompt row from the subject's last token on (editors/rome.py)


class BudgetError(ValueError):
    """A profile, device or rate that the budget cannot use; the message names the option."""


# ----------------------------------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Shape:
    """The sizes the cost depends on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    dtype_bytes: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def block_params(self) -> int:
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * self.head_dim
        return attention + 3 * self.hidden * self.intermediate

    @property
    def weight_bytes(self) -> int:
        return (self.layers * self.block_params + 2 * self.vocab * self.hidden) * self.dtype_bytes

    def forward_flops(self, tokens: int, blocks: int, logits: int) -> int:
        """A forward pass of one row of ``tokens`` through ``blocks`` blocks (each token attending to those
        before it) and the head at ``logits`` positions: 2 FLOPs per weight and token, plus attention."""
        attention = 2 * self.hidden * tokens * (tokens + 1)  # QK^T and AV over the causal half
        return blocks * (2 * self.block_params * tokens + attention) + 2 * self.hidden * self.vocab * logits

    def block_bytes(self, blocks: int, head: bool = True) -> int:
        return (blocks * self.block_params + (self.vocab * self.hidden if head else 0)) * self.dtype_bytes


@dataclass(frozen=True)
class ModelProfile:
    name: str
    source: str
    shape: Mapping[str, Any]

    def config_fields(self) -> dict[str, Any]:
        """The LlamaConfig (config.json) fields of the shape."""
        return {k: v for k, v in self.shape.items() if k != "model_type"}

    def sizes(self, dtype_bytes: int = 2) -> Shape:
        s = self.shape
        return Shape(s["num_hidden_layers"], s["hidden_size"], s["intermediate_size"], s["num_attention_heads"],
                     s["num_key_value_heads"], s["vocab_size"], dtype_bytes)


@dataclass(frozen=True)
class Device:
    name: str
    source: str
    memory_gb: float
    bf16_tflops: float
    fp64_tflops: float
    bandwidth_gbs: float

    @property
    def memory(self) -> float:
        return self.memory_gb * 1e9


class Models(dict[str, ModelProfile]):
    """The model profiles by name."""

    def shape_of(self, config: Any, dtype_bytes: int = 2) -> Shape:
        """The ``Shape`` of a transformers config (a built model's)."""
        heads = config.num_attention_heads
        return Shape(config.num_hidden_layers, config.hidden_size, config.intermediate_size, heads,
                     getattr(config, "num_key_value_heads", None) or heads, config.vocab_size, dtype_bytes)


@cache
def _profiles() -> dict[str, Any]:
    return yaml.safe_load(resources.files("overtone.study").joinpath("profiles.yaml").read_text())


def devices() -> dict[str, Device]:
    return {name: Device(name, **entry) for name, entry in _profiles()["devices"].items()}


MODELS = Models({name: ModelProfile(name, entry["source"], entry["shape"])
                 for name, entry in _profiles()["models"].items()})


def model_profile(name: str) -> ModelProfile:
    if name not in MODELS:
        raise BudgetError(f"--profile {name!r} has no model shape for a budget; known: {', '.join(MODELS)}")
    return MODELS[name]


def device(name: str) -> Device:
    known = devices()
    if name not in known:
        raise BudgetError(f"--gpu {name!r} is not a known device; known: {', '.join(known)}")
    return known[name]


# ------------------------------------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class CaseTokens:
    """A case's token counts: its edit sequence and target, and each evaluated probe (prompt, answer)."""

    edit: int
    target: int
    probes: tuple[tuple[int, int], ...]


def words(per_word: float) -> Callable[[str], int]:
    """A token count from words, where no tokenizer of the model is at hand (one more for the BOS token)."""
    return lambda text: 1 + math.ceil(per_word * len(text.split()))


def case_tokens(count: Callable[[str], int], case: EditCase) -> CaseTokens:
    """``count`` (tokens of a text) applied to the case's texts: the rewrite, its rephrases and its portability
    and locality probes, as the teacher-forced evaluator asks them."""
    probes = [(case.prompt, case.target)] + [(r, case.target) for r in case.rephrases]
    probes += [(p.prompt, p.answer) for group in (case.portability, case.locality) for ps in group.values()
               for p in ps]
    pairs = tuple((count(prompt), count(f"{prompt} {answer}") - count(prompt)) for prompt, answer in probes)
    return CaseTokens(edit=sum(pairs[0]), target=max(1, pairs[0][1]), probes=pairs)


# --------------------------------------------------------------------------------------------------- edit cost


@dataclass(frozen=True)
class EditSite:
    """Where and how an editor trains: the blocks a step runs through, its rows, the trained weights (their
    weight gradients), its steps, and MEMIT's solves (fp64 systems of the MLP width, one per layer)."""

    first_layer: int
    top_layer: int  # a step runs blocks first..layers-1 (ROME/MEMIT: from the value's layer up)
    rows: int
    trained: int
    steps: int
    solves: int = 0
    locate: bool = False  # rows are ROME/MEMIT's prompt variants, LOCATE_TAIL tokens each past the subject


def _setting(config: Any, name: str, default: Any) -> Any:
    value = getattr(config, name, None) if config is not None else None
    return default if value is None else value


def _preset(editor: str, profile: str, name: str) -> Any:
    from overtone.editors import EDITORS
    from overtone.editors.presets import editor_presets

    presets = editor_presets(editor, EDITORS[editor].config_class)
    settings = dict(presets.fallback.settings) if presets.fallback else {}
    if profile in presets.models:
        settings.update(presets.models[profile].settings)
    return settings.get(name)


def edit_site(editor: str, shape: Shape, config: Any, profile: str = "") -> EditSite:
    """The ``EditSite`` of ``editor`` with ``config`` (unset fields: its defaults and ``profile``'s presets)."""
    from overtone.editors import ft_m, memit, rome

    n = shape.layers
    if editor == "ft-m":
        layer = _setting(config, "layer", ft_m.default_layer(n))
        return EditSite(layer, layer, 1, shape.hidden * shape.intermediate, _setting(config, "steps", 25))
    if editor == "lora":
        return EditSite(0, 0, 1, 0, _setting(config, "steps", 70))
    if editor in ("rome", "memit"):
        rows = 1 + sum(c for _, c in _setting(config, "context_lengths", ((10, 5),))) + KL_ROWS
        steps = _setting(config, "steps", 24)
        if editor == "rome":
            layer = _setting(config, "layer", min(n - 1, round(rome.REFERENCE_DEPTH * n)))
            return EditSite(layer, layer, rows, 0, steps, locate=True)
        low, high = (min(n - 1, round(d * n)) for d in memit.REFERENCE_DEPTHS)
        layers = _setting(config, "layers", tuple(range(low, high + 1)))
        return EditSite(layers[0], layers[-1], rows, 0, steps, solves=len(layers), locate=True)
    if editor == "wise":
        layer = _setting(config, "layer", _preset("wise", profile, "layer"))
        steps = _setting(config, "steps", _preset("wise", profile, "steps"))
        if layer is None or steps is None:
            raise BudgetError(f"wise has no preset for --profile {profile!r}: its layer and steps are unknown")
        return EditSite(layer, layer, 1, shape.hidden * shape.intermediate, steps)
    if editor == "melo":
        layers = _setting(config, "layers", _preset("melo", profile, "layers"))
        steps = _setting(config, "steps", _preset("melo", profile, "steps"))
        if layers is None or steps is None:
            raise BudgetError(f"melo has no preset for --profile {profile!r}: its layers and steps are unknown")
        return EditSite(min(layers), min(layers), 1, 0, steps)
    raise BudgetError(f"no cost model for editor {editor!r}")


@dataclass(frozen=True)
class EditCost:
    """One case's edit: FLOPs per step, the weight bytes a step reads (shared by a window), steps, and the
    one-off recording pass and fp64 solve FLOPs."""

    step_flops: int
    weight_bytes: int
    steps: int
    record_flops: int
    solve_flops: int


def edit_cost(editor: str, shape: Shape, config: Any, tokens: CaseTokens, profile: str = "") -> EditCost:
    """The cost of editing one case (see the module's docstring)."""
    site = edit_site(editor, shape, config, profile)
    blocks = shape.layers - site.top_layer
    row_tokens = LOCATE_TAIL if site.locate else tokens.edit
    scored = tokens.target if not site.locate else tokens.target + 1  # the KL prompt's one position
    forward = site.rows * shape.forward_flops(row_tokens, blocks, scored)
    step = 2 * forward + 2 * tokens.edit * site.trained
    record = site.rows * shape.forward_flops(tokens.edit if not site.locate else row_tokens, site.top_layer, 0)
    solve = site.solves * (2 * shape.intermediate ** 3 // 3 + 2 * shape.intermediate ** 2)
    return EditCost(step, shape.block_bytes(blocks), site.steps, record, solve)


# ---------------------------------------------------------------------------------------------- evaluation cost


@dataclass(frozen=True)
class EvalCost:
    """One case's evaluation: its FLOPs (teacher-forced passes, the generation's prefills and decode steps) and
    how often it reads the weights, once per window: two teacher-forced passes and every decode step."""

    flops: int
    reads: int


def eval_cost(shape: Shape, tokens: CaseTokens, evaluation: str, first_layer: int, reply: int = 50) -> EvalCost:
    """Teacher-forced: every probe through the unedited model and, from ``first_layer``, the edited one;
    wild: every probe's prompt prefilled and ``reply`` tokens decoded, before and after; both: the two."""
    flops = 0
    if evaluation in ("teacher-forced", "both"):
        for prompt, answer in tokens.probes:
            length = prompt + answer
            flops += shape.forward_flops(length, shape.layers, length)
            flops += shape.forward_flops(length, shape.layers - first_layer, length)
    reads = 2 if evaluation in ("teacher-forced", "both") else 0
    if evaluation in ("wild", "both"):
        for prompt, _ in tokens.probes:
            flops += 2 * shape.forward_flops(prompt, shape.layers, 1)
            flops += 2 * reply * shape.forward_flops(1, shape.layers, 1)
        reads += 2 * reply
    return EvalCost(flops, reads)


# -------------------------------------------------------------------------------------------------------- rates


@dataclass(frozen=True)
class MachineRates:
    """Peaks of a machine in FLOPs and bytes per second (and its fp64 FLOPs), with the shares of them that
    editing and evaluation reach."""

    flops: float
    bandwidth: float
    fp64: float = 0.0
    edit_efficiency: float = 1.0
    eval_efficiency: float = 1.0

    @classmethod
    def of(cls, gpu: Device, efficiency: Mapping[str, float]) -> MachineRates:
        return cls(gpu.bf16_tflops * 1e12, gpu.bandwidth_gbs * 1e9, gpu.fp64_tflops * 1e12, efficiency["edit"],
                   efficiency["eval"])

    def step_seconds(self, flops: float, weight_bytes: float) -> float:
        """A roofline: the longer of the compute and the weights' reading."""
        return max(flops / self.flops, weight_bytes / self.bandwidth) / self.edit_efficiency

    def edit_seconds(self, cost: EditCost, window: int) -> float:
        """One case's edit in a window of ``window`` cases."""
        steps = cost.steps * self.step_seconds(cost.step_flops * window, cost.weight_bytes) / window
        solves = cost.solve_flops / self.fp64 if cost.solve_flops else 0.0
        return steps + cost.record_flops / self.flops / self.edit_efficiency + solves

    def eval_seconds(self, cost: EvalCost, shape: Shape, window: int = 1) -> float:
        """One case's evaluation in a window of ``window`` cases: its FLOPs, or its share of the window's
        reading of the weights, whichever is longer."""
        reading = cost.reads * shape.weight_bytes / window / self.bandwidth
        return max(cost.flops / self.flops, reading) / self.eval_efficiency


def parse_rates(text: str | None) -> dict[str, float]:
    """``--rate edit=S,eval=S``: seconds per case of editing and of evaluation on the device (either alone)."""
    if not text:
        return {}
    rates: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in ("edit", "eval"):
            raise BudgetError(f"--rate takes edit=SECONDS,eval=SECONDS (seconds per case), got {part.strip()!r}")
        try:
            seconds = float(value)
        except ValueError:
            raise BudgetError(f"--rate {key}={value!r}: not a number of seconds") from None
        if not math.isfinite(seconds) or seconds < 0:
            raise BudgetError(f"--rate {key}={value!r}: seconds per case must be finite and >= 0")
        rates[key] = seconds
    return rates


# ------------------------------------------------------------------------------------------------------- budget


def case_memory(editor: str, shape: Shape, config: Any, profile: str = "", evaluation: str = "teacher-forced",
                reply: int = 50) -> CaseMemory | None:
    """One case of a parallel edit (the editors' own memory model, with the generated replies' key/value cache
    when ``evaluation`` generates them, as the runner counts it), or None: one case at a time."""
    from overtone.editors import EDITORS, ft_m, lora, memit, rome
    from overtone.editors.lora import LoRAConfig
    from overtone.editors.memit import MEMITConfig
    from overtone.editors.parallel import ModelShape
    from overtone.editors.rome import ROMEConfig
    from overtone.evaluation.wild import reply_memory

    if EDITORS[editor].parallel_refusal is not None:
        return None
    model = ModelShape(shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.head_dim, shape.kv_heads,
                       shape.vocab, shape.dtype_bytes)
    site = edit_site(editor, shape, config, profile)
    if editor == "ft-m":
        memory = ft_m.case_memory(model, site.first_layer)
    elif editor == "lora":
        memory = lora.case_memory(model, config or LoRAConfig())
    elif editor == "rome":
        memory = rome.case_memory(model, config or ROMEConfig(), site.first_layer)
    elif editor == "memit":
        memory = memit.case_memory(model, config or MEMITConfig(), site.solves, site.top_layer)
    else:
        return None
    replies = reply_memory(model, reply) if evaluation in ("wild", "both") else 0
    return replace(memory, evaluation=replies)


def window_size(parallel: int | str, editor: str, shape: Shape, config: Any, gpu: Device, profile: str,
                evaluation: str = "teacher-forced", reply: int = 50) -> int:
    """Cases edited at once: the cell's number, or --parallel auto's rule on the device's memory."""
    memory = case_memory(editor, shape, config, profile, evaluation, reply)
    if memory is None:
        return 1
    if parallel != "auto":
        return int(parallel)
    free = gpu.memory - shape.weight_bytes
    return max(1, min(AUTO_MAX, memory.fits(AUTO_SHARE * free)))


@dataclass
class CellBudget:
    """One cell's share: cases, window, and seconds of editing and evaluation on the device."""

    name: str
    editor: str
    cases: int
    window: int
    edit_s: float
    eval_s: float


@dataclass
class Budget:
    """A study's budget on one device, cell by cell, with what it assumes."""

    device: Device
    profile: ModelProfile
    cells: list[CellBudget] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    @property
    def edit_hours(self) -> float:
        return sum(c.edit_s for c in self.cells) / 3600

    @property
    def eval_hours(self) -> float:
        return sum(c.eval_s for c in self.cells) / 3600


def plan_budget(cells: Sequence[tuple[Any, Sequence[EditCase]]], profile: str, gpu: str,
                rates: Mapping[str, float] | None = None) -> Budget:
    """The budget of ``cells`` ((cell, its cases)) on ``gpu`` at model ``profile``'s shape."""
    from overtone.editors import editor_config

    model, dev = model_profile(profile), device(gpu)
    data = _profiles()
    efficiency, token_rules = data["efficiency"], data["tokens"]
    shape = model.sizes()
    machine = MachineRates.of(dev, efficiency)
    count = words(token_rules["per_word"])
    rates = dict(rates or {})
    budget = Budget(dev, model)
    for cell, cases in cells:
        config = editor_config(cell.editor, **dict(cell.settings))
        window = window_size(cell.parallel, cell.editor, shape, config, dev, profile, cell.evaluation,
                             token_rules["reply"])
        edit_s = eval_s = 0.0
        for case in cases:
            tokens = case_tokens(count, case)
            cost = edit_cost(cell.editor, shape, config, tokens, profile)
            first = edit_site(cell.editor, shape, config, profile).first_layer
            edit_s += rates["edit"] if "edit" in rates else machine.edit_seconds(cost, window)
            evaluation = eval_cost(shape, tokens, cell.evaluation, first, token_rules["reply"])
            eval_s += rates["eval"] if "eval" in rates else machine.eval_seconds(evaluation, shape, window)
        budget.cells.append(CellBudget(cell.name, cell.editor, len(cases), window, edit_s, eval_s))
    budget.assumptions = [
        f"device {dev.name}: {dev.bf16_tflops:g} TFLOPS bf16, {dev.fp64_tflops:g} TFLOPS fp64, "
        f"{dev.bandwidth_gbs:g} GB/s, {dev.memory_gb:g} GB ({dev.source})",
        f"model {model.name}: {shape.layers} layers, hidden {shape.hidden}, MLP {shape.intermediate}, "
        f"{shape.heads} heads ({shape.kv_heads} key-value), vocabulary {shape.vocab}, bf16 weights "
        f"{shape.weight_bytes / 1e9:.1f} GB ({model.source})",
        f"efficiency: editing {efficiency['edit']:g}, evaluation {efficiency['eval']:g} of the peaks "
        f"({' '.join(str(efficiency['source']).split())})",
        f"tokens: {token_rules['per_word']:g} per word of the dataset files (+1 BOS); a generated reply "
        f"{token_rules['reply']} tokens ({' '.join(str(token_rules['source']).split())})",
        "steps per edit: each editor's maximum (its config and presets: FT-M 25, LoRA 70, ROME/MEMIT 24 value "
        "steps, WISE and MELO their presets'); an edit that stops early costs less, so editing is an upper bound",
        "a step reads the weights of the blocks it trains through once per window of B cases; B = the cell's "
        "--parallel, or auto: half the memory beside the weights over the editor's bytes per case, at most 64 "
        "(WISE and MELO edit one case at a time)",
        "evaluation: teacher-forced = a full forward of every probe before the edit and one from the edit's "
        "first layer after it; wild = every probe's prompt prefilled and its reply decoded, before and after, "
        "each decode step reading the weights once per window",
    ]
    if rates:
        budget.assumptions.append("rates given: " + ", ".join(f"{k} {v:g} s per case" for k, v in rates.items()))
    return budget
