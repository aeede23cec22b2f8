"""Parallel single editing: B cases edited at once, each against the unedited weights.

Single editing edits a case, evaluates it and reverts, so cases are independent. ``edit_parallel``
runs B of them side by side: each case has its own change of the edited tensors
(``models.per_case``), its own optimiser state and its own stop, and leaves the batch when it stops.
Nothing is written into the model's weights; evaluation runs the B edited models in one batch with
``CaseEdits.applied``. A case gets the steps, the stop and the metrics it gets when edited alone, up
to floating-point summation order (tests/test_parallel.py).

* ``CaseEdits``: what a parallel edit returns: per-case statistics and changes;
* ``CaseParameters``: trainable tensors whose first dimension is the case, with one Adam whose state
  rows follow the cases still training;
* ``parallel_size``: the B of ``--parallel auto``, from free memory and one case's memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from overtone.benchmarks.cases import EditCase
from overtone.editors.reports import EditStats
from overtone.models.per_case import CaseChange, CaseRows, patched

log = logging.getLogger(__name__)

# --parallel auto: at most this share of the free memory goes to the cases, and at most this many cases.
AUTO_MEMORY_SHARE = 0.5
AUTO_MAX = 64


@dataclass
class CaseEdits:
    """The result of ``Editor.edit_parallel``: every case's statistics and change, none in the model's weights.

    ``changes`` maps each edited module to its per-case change, cases in the order of ``cases``.
    ``applied(rows)`` is the hook for evaluating the B edited models at once: any forward pass inside it
    (teacher-forced, replayed or generating) sees case i's edit on the rows that ``rows`` gives case i.
    """

    cases: list[EditCase]
    stats: list[EditStats]
    first_layer: int
    changes: dict[nn.Module, CaseChange]

    def applied(self, rows: CaseRows) -> AbstractContextManager[None]:
        """Forward passes inside see case i's edit on the rows of case i."""
        return patched(self.changes, rows)

    def only(self, case: int) -> AbstractContextManager[None]:
        """Forward passes inside see case ``case``'s edit on every row: the model as that edit alone leaves it."""
        return patched({m: c.select([case]) for m, c in self.changes.items()}, None)


class CaseParameters:
    """Trainable tensors whose first dimension is the case, trained by one Adam with per-row state.

    Adam is elementwise, so row i's update depends on row i's gradient and state only: the rows train as
    B separate optimisers would. Every case starts at step 0 and a case that stops leaves with its
    optimiser state (``keep``), so the step count shared by the bias correction is each remaining
    case's own. A case's values when it leaves are kept (``finish``).
    """

    def __init__(self, initial: dict[str, torch.Tensor], lr: float, weight_decay: float = 0.0) -> None:
        sizes = {t.size(0) for t in initial.values()}
        if len(sizes) != 1:
            raise ValueError(f"per-case tensors disagree on the number of cases: {sorted(sizes)}")
        self.tensors = {k: v.detach().clone().requires_grad_(True) for k, v in initial.items()}
        self.optimiser = torch.optim.Adam(list(self.tensors.values()), lr=lr, weight_decay=weight_decay)
        n = sizes.pop()
        self.cases = list(range(n))  # the case held by each row
        self._final: dict[str, list[torch.Tensor | None]] = {k: [None] * n for k in initial}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def backward(self, loss: torch.Tensor) -> None:
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()

    def step(self) -> None:
        self.optimiser.step()

    def keep(self, positions: Sequence[int]) -> None:
        """Keep the cases at ``positions`` (rows of the present tensors), with their gradients and Adam state."""
        positions = list(positions)
        if positions == list(range(len(self.cases))):
            return
        kept = set(positions)
        group = self.optimiser.param_groups[0]
        for name, tensor in list(self.tensors.items()):
            for p, case in enumerate(self.cases):
                if p not in kept:
                    self._final[name][case] = tensor.detach()[p].clone()
            index = torch.tensor(positions, dtype=torch.long, device=tensor.device)
            new = tensor.detach()[index].clone().requires_grad_(True)
            if tensor.grad is not None:
                new.grad = tensor.grad[index]
            state = self.optimiser.state.pop(tensor, None)
            if state:
                self.optimiser.state[new] = {k: v[index] if v.dim() > 0 else v for k, v in state.items()}
            group["params"] = [new if p is tensor else p for p in group["params"]]
            self.tensors[name] = new
        self.cases = [self.cases[p] for p in positions]

    def finish(self) -> dict[str, torch.Tensor]:
        """Every case's values when it left, stacked in case order (the cases still here leave now)."""
        self.keep([])
        out = {}
        for name, values in self._final.items():
            assert all(v is not None for v in values)
            out[name] = torch.stack(values)  # type: ignore[arg-type]
        return out


# Values of a weight widened at once by a closed-form write (``locate.update.add_update``; 32 MiB in fp64): the
# write goes a block of rows at a time, and the memory model counts its blocks.
WRITE_CHUNK_VALUES = 1 << 22


@dataclass(frozen=True)
class ModelShape:
    """The sizes that one case's memory depends on, read from a model config (no weights needed)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    head_dim: int
    kv_heads: int
    vocab: int
    dtype_bytes: int

    @classmethod
    def of(cls, config: Any, dtype: torch.dtype) -> ModelShape:
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        heads = getattr(config, "num_attention_heads", None) or config.n_head
        intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
        return cls(hidden=hidden, intermediate=intermediate,
                   layers=getattr(config, "num_hidden_layers", None) or config.n_layer, heads=heads,
                   head_dim=getattr(config, "head_dim", None) or hidden // heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads, vocab=config.vocab_size,
                   dtype_bytes=torch.empty(0, dtype=dtype).element_size())

    @property
    def fp32_head(self) -> int:
        """Bytes of the float32 copy of the vocabulary head that the training objectives read
        (``ModelAdapter.logits(fp32=True)``): made once when the model is not in float32, shared by every case.
        """
        return 4 * self.vocab * self.hidden if self.dtype_bytes != 4 else 0

    def mlp_write(self, matrices: int = 1) -> int:
        """Bytes of a closed-form write into ``matrices`` MLP output projections by a sequential edit (``edit``,
        ``--parallel 1``): per matrix, its copy for the revert and for the saved edit's base (in the model's
        dtype) and the update's float32 product; the write itself widens a block of rows at a time
        (``WRITE_CHUNK_VALUES``: three float64 blocks)."""
        return matrices * (2 * self.dtype_bytes + 4) * self.hidden * self.intermediate + 3 * 8 * WRITE_CHUNK_VALUES

    def step_activations(self, rows: int, tokens: int, blocks: int, scored: int) -> int:
        """Bytes autograd keeps for one training pass: ``rows`` x ``tokens`` tokens through ``blocks`` blocks,
        then the float32 logits at ``scored`` positions.

        Per token and block (4 hidden + 2 intermediate + heads x tokens) values: measured with
        ``torch.autograd.graph.saved_tensors_hooks`` on the embedded model (7.3 to 8.0 hidden widths per
        token and block, weights excluded), against 4 + 2 x 1536/576 = 9.3 here: an upper estimate.
        """
        per_token = (4 * self.hidden + 2 * self.intermediate + self.heads * tokens) * self.dtype_bytes
        return rows * tokens * blocks * per_token + 3 * scored * self.vocab * 4

    def reply_cache(self, rows: int, tokens: int) -> int:
        """Bytes held while ``rows`` replies are generated, each ``tokens`` long with its prompt: their key/value
        cache, twice over. The cache grows by one concatenation per layer and step, and the memory the old
        copies leave is not all reused: the 7B rehearsal's generated answers peaked at 2.0 to 2.4 times their
        final cache (docs/performance.md)."""
        return 2 * rows * tokens * self.layers * 2 * self.kv_heads * self.head_dim * self.dtype_bytes


# Bytes per trained float32 value that Adam's update allocates for a moment: the square root of the second
# moment, then its quotient by the bias correction (torch's single-tensor Adam, the CPU's default, holds both;
# the foreach path on CUDA one). Measured by the 7B rehearsal (docs/performance.md).
ADAM_TEMPORARIES = 8

# Lengths assumed by the estimates: tokens of one edit sequence and target tokens scored in it.
EDIT_TOKENS = 32
TARGET_TOKENS = 8


@dataclass(frozen=True)
class CaseMemory:
    """Memory one case of a parallel edit needs, in bytes: its state, and the larger of its activations during a
    training step and what evaluating its edited model holds (the two come one after the other)."""

    state: int  # change + gradient + optimiser state + the change kept for evaluation
    activations: int  # saved for the backward pass of one training step (estimate, see docs/parallel.md)
    shared: int = 0  # needed once by a window of any size (ModelShape.fp32_head, a sequential write, MEMIT's
    # solve); not in ``total``
    evaluation: int = 0  # the evaluator's share (``Evaluator.case_memory``); the editors leave it to the runner

    @property
    def total(self) -> int:
        return self.state + max(self.activations, self.evaluation)

    def fits(self, free: float) -> int:
        """How many cases ``free`` bytes hold once the window's shared part is set aside (0 or more)."""
        return max(0, int((free - self.shared) // max(1, self.total)))


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: CUDA device memory, or available RAM for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def parallel_size(memory: CaseMemory, device: torch.device, most: int | None = None) -> int:
    """The B of ``--parallel auto``: as many cases as fit in half the free memory less what the window needs
    once (``memory.shared``), at most ``AUTO_MAX`` and ``most``, at least 1. Logs what it chose and why."""
    free = free_memory(device)
    size = max(1, min(AUTO_MAX, memory.fits(AUTO_MEMORY_SHARE * free), most or AUTO_MAX))
    log.info("--parallel auto: %d cases at once (%.0f MiB per case: %.0f state + the larger of %.0f activations and "
             "%.0f evaluation; %.0f MiB once; %.1f GiB free on %s, %.0f%% of it usable; at most %d)", size,
             memory.total / 2**20, memory.state / 2**20, memory.activations / 2**20, memory.evaluation / 2**20,
             memory.shared / 2**20, free / 2**30, device.type, 100 * AUTO_MEMORY_SHARE, most or AUTO_MAX)
    return size
