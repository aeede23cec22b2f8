"""Per-case changes to shared weights: row r of a batch sees only the change of the case that owns it.

Parallel single editing (``Editor.edit_parallel``) edits B cases at once, each against the unedited
weights. Their changes are never written into the model. For the length of a forward pass the changed
modules are patched (``patched``) so that the rows of case i go through case i's change only:

* ``CaseWeights``: a whole matrix per case (FT-M's ``down_proj``): y = x W_i^T + bias;
* ``CaseLowRank``: a low-rank term per case on top of the shared module, y = f(x) + s (d_i(x) A_i^T) B_i^T
  (LoRA's adapters, ROME's and MEMIT's rank-one updates), optionally with dropout d_i whose masks come
  from case i's own random generator, drawn exactly as the case alone draws them (``dropout_noise``).

``CaseRows`` says which rows belong to which case: every case owns consecutive rows. The recorded
block inputs of a batch (``SuffixCache``) follow the cases still training through ``select_rows``.
Any forward pass can run under ``patched``, generation included, as long as its rows keep their order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from overtone.models.replay import SuffixCache


@dataclass(frozen=True)
class CaseRows:
    """Which case owns each row of a batch: ``owners[r]`` is the case (0..n_cases-1) of row r.

    Training batches keep each case's rows consecutive and in case order (``slices``); evaluation
    batches may mix them (rows sorted by length). ``lengths[i]`` (optional) is the token length of
    case i's rows as the case alone pads them: per-case dropout draws its masks at that length, so that
    they are the masks the case draws alone.
    """

    owners: tuple[int, ...]
    n_cases: int
    lengths: tuple[int, ...] | None = None

    @classmethod
    def consecutive(cls, counts: Sequence[int], lengths: Sequence[int] | None = None) -> CaseRows:
        """Case i owns the next ``counts[i]`` rows."""
        owners = tuple(i for i, count in enumerate(counts) for _ in range(count))
        return cls(owners, len(counts), None if lengths is None else tuple(lengths))

    @property
    def n_rows(self) -> int:
        return len(self.owners)

    @property
    def contiguous(self) -> bool:
        return all(a <= b for a, b in zip(self.owners, self.owners[1:], strict=False)) and \
            len(set(self.owners)) == self.n_cases

    @property
    def slices(self) -> list[slice]:
        """The rows of each case, for a batch whose cases own consecutive rows in case order."""
        if not self.contiguous:
            raise ValueError("the cases' rows are not consecutive")
        out, start = [], 0
        for i in range(self.n_cases):
            count = self.owners.count(i)
            out.append(slice(start, start + count))
            start += count
        return out

    @property
    def uniform(self) -> int | None:
        """Rows per case when the cases own consecutive rows, as many each (they reshape to [cases, rows])."""
        if not self.contiguous:
            return None
        counts = {self.owners.count(i) for i in range(self.n_cases)}
        return counts.pop() if len(counts) == 1 else None

    def rows_of(self, case: int) -> list[int]:
        return [r for r, owner in enumerate(self.owners) if owner == case]

    def select(self, cases: Sequence[int]) -> tuple[CaseRows, list[int]]:
        """The rows of ``cases`` (renumbered 0.. in the order given), and their row indices here."""
        new = {case: i for i, case in enumerate(cases)}
        rows = [r for case in cases for r in self.rows_of(case)]
        lengths = None if self.lengths is None else tuple(self.lengths[i] for i in cases)
        return CaseRows(tuple(new[self.owners[r]] for r in rows), len(cases), lengths), rows


def per_case(x: torch.Tensor, rows: CaseRows, fn: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(i, x_i)`` on the rows of each case i, put back in row order (differentiable)."""
    if rows.contiguous:
        return torch.cat([fn(i, x[s]) for i, s in enumerate(rows.slices)])
    order = [r for i in range(rows.n_cases) for r in rows.rows_of(i)]
    pieces = [fn(i, x[rows.rows_of(i)]) for i in range(rows.n_cases) if rows.rows_of(i)]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return torch.cat(pieces)[inverse.to(x.device)]


def _take(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """``value`` cut to ``rows`` where it is per row: a tensor of >= 2 dims whose first has the batch's size."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() >= 2 and value.size(0) == batch else value
    if isinstance(value, tuple):
        return tuple(_take(v, rows, batch) for v in value)
    if isinstance(value, list):
        return [_take(v, rows, batch) for v in value]
    if isinstance(value, dict):
        return {k: _take(v, rows, batch) for k, v in value.items()}
    return value


def select_rows(cache: SuffixCache, rows: Sequence[int]) -> SuffixCache:
    """The recorded inputs of ``rows`` only (attention masks, rotary tables and other per-row arguments cut alike).

    An argument is per row when it is a tensor of two or more dimensions whose first equals the batch
    size; position tables broadcast over the batch (first dimension 1) and 1-D positions are kept whole.
    """
    batch = cache.hidden.size(0)
    index = torch.tensor(list(rows), dtype=torch.long, device=cache.hidden.device)
    return SuffixCache(start=cache.start, hidden=cache.hidden[index],
                       calls=[(_take(args, index, batch), _take(kwargs, index, batch)) for args, kwargs in cache.calls])


def take_rows(value: Any, rows: Sequence[int], batch: int) -> Any:
    """``select_rows`` for any recorded structure (tuples, lists, dicts of tensors) of a batch of ``batch`` rows."""
    device = next((t.device for t in _tensors(value)), torch.device("cpu"))
    return _take(value, torch.tensor(list(rows), dtype=torch.long, device=device), batch)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def dropout_noise(shape: Sequence[int], p: float, generator: torch.Generator, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """The inverted-dropout multiplier (0 or 1/(1-p)) of one case's dropout, drawn from its own generator.

    Sequential and parallel LoRA both draw their masks here, so a case draws the same masks alone
    and inside a batch: the number and order of draws depend on the case's own shape only.
    """
    noise = torch.empty(tuple(shape), dtype=dtype, device=device).bernoulli_(1 - p, generator=generator)
    return noise.div_(1 - p)


class CaseChange(Protocol):
    """The change of one module for each of ``n_cases`` cases."""

    @property
    def n_cases(self) -> int: ...

    def output(self, module: nn.Module, base: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               rows: CaseRows | None) -> torch.Tensor:
        """The module's output on ``x`` with each case's change on its rows (``rows`` None: one case, every row)."""
        ...

    def select(self, cases: Sequence[int]) -> CaseChange:
        """The change of ``cases`` only, in that order."""
        ...


@dataclass
class CaseWeights:
    """A whole weight matrix per case, in the module's own layout and dtype: [cases, *weight.shape]."""

    weight: torch.Tensor
    conv1d: bool = False  # GPT-2's Conv1D: the weight is [in, out] and y = x W + b

    @property
    def n_cases(self) -> int:
        return self.weight.size(0)

    def _one(self, module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """What the module computes with ``weight`` in place of its own (the same operation)."""
        bias = module.bias
        if self.conv1d:
            flat = x.reshape(-1, x.size(-1))
            y = torch.addmm(bias, flat, weight) if bias is not None else flat @ weight
            return y.view(*x.shape[:-1], weight.size(-1))
        return F.linear(x, weight, bias)

    def output(self, module: nn.Module, base: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               rows: CaseRows | None) -> torch.Tensor:
        if rows is None:
            return self._one(module, x, self.weight[0])
        if rows.uniform is not None:
            # every case owns as many consecutive rows: one batched product
            flat = x.reshape(rows.n_cases, -1, x.size(-1))
            y = torch.bmm(flat, self.weight if self.conv1d else self.weight.transpose(1, 2))
            if module.bias is not None:
                y = y + module.bias
            return y.reshape(*x.shape[:-1], y.size(-1))
        return per_case(x, rows, lambda i, xi: self._one(module, xi, self.weight[i]))

    def select(self, cases: Sequence[int]) -> CaseWeights:
        return replace(self, weight=self.weight[list(cases)])


@dataclass
class CaseDropout:
    """Dropout with one random generator per case (LoRA's adapter dropout in a parallel edit)."""

    p: float
    generators: list[torch.Generator]

    def __call__(self, x: torch.Tensor, rows: CaseRows | None) -> torch.Tensor:
        if rows is None:
            return x * dropout_noise(x.shape, self.p, self.generators[0], x.dtype, x.device)
        lengths = rows.lengths
        if lengths is None:
            raise ValueError("per-case dropout needs each case's own row length (CaseRows.lengths)")

        def drop(i: int, xi: torch.Tensor) -> torch.Tensor:
            noise = torch.zeros_like(xi)
            noise[:, : lengths[i]] = dropout_noise((xi.size(0), lengths[i], *xi.shape[2:]), self.p,
                                                   self.generators[i], xi.dtype, xi.device)
            return xi * noise

        return per_case(x, rows, drop)

    def select(self, cases: Sequence[int]) -> CaseDropout:
        return CaseDropout(self.p, [self.generators[i] for i in cases])


@dataclass
class CaseLowRank:
    """A low-rank term per case added to the module's output: ``scale * (d(x) down_i^T) up_i^T / divisor``.

    ``down`` is [cases, r, in], ``up`` [cases, out, r] (the ``nn.Linear`` orientation whatever the
    module's layout). LoRA: down = A, up = B, scale = alpha / r; AdaLoRA: down = A * E, scale = alpha,
    divisor = its rank number; ROME and MEMIT: r = 1, down = u, up = the update's column.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0
    divisor: float | None = None
    dropout: CaseDropout | None = None  # active only when given (training passes)

    @property
    def n_cases(self) -> int:
        return self.down.size(0)

    def _term(self, h: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        term = F.linear(F.linear(h, down), up) * self.scale
        return term / self.divisor if self.divisor is not None else term

    def output(self, module: nn.Module, base: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               rows: CaseRows | None) -> torch.Tensor:
        result = base(x)
        h = x.to(self.down.dtype)
        if self.dropout is not None:
            h = self.dropout(h, rows)
        if rows is None:
            term = self._term(h, self.down[0], self.up[0])
        elif rows.uniform is not None:
            flat = h.reshape(rows.n_cases, -1, h.size(-1))
            term = torch.bmm(torch.bmm(flat, self.down.transpose(1, 2)), self.up.transpose(1, 2)) * self.scale
            if self.divisor is not None:
                term = term / self.divisor
            term = term.reshape(*h.shape[:-1], term.size(-1))
        else:
            term = per_case(h, rows, lambda i, hi: self._term(hi, self.down[i], self.up[i]))
        return (result + term).to(result.dtype)

    def select(self, cases: Sequence[int]) -> CaseLowRank:
        index = list(cases)
        dropout = None if self.dropout is None else self.dropout.select(index)
        return replace(self, down=self.down[index], up=self.up[index], dropout=dropout)


class _Patched:
    """A module's forward replaced by its case changes for the rows of each case."""

    def __init__(self, change: CaseChange, module: nn.Module, base: Callable[..., torch.Tensor],
                 rows: CaseRows | None) -> None:
        self.change, self.module, self.base, self.rows = change, module, base, rows

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            raise TypeError(f"a patched {type(self.module).__name__} takes its input only")
        return self.change.output(self.module, self.base, x, self.rows)


@contextlib.contextmanager
def patched(changes: Mapping[nn.Module, CaseChange], rows: CaseRows | None) -> Iterator[None]:
    """Within the block, module m computes ``changes[m]``'s output: case i's change on the rows of case i.

    ``rows`` None: every row of any batch belongs to the one case of the changes (a single case's view,
    e.g. for generation with a single edited model). The modules' forwards are restored on exit.
    """
    for change in changes.values():
        expected = 1 if rows is None else rows.n_cases
        if change.n_cases != expected:
            raise ValueError(f"a change for {change.n_cases} case(s) cannot serve {expected}")
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for module, change in changes.items():
            own = module.__dict__.get("forward")  # an instance-level forward (e.g. accelerate's hooks), kept
            module.forward = _Patched(change, module, module.forward, rows)
            saved.append((module, own))
        yield
    finally:
        for module, own in reversed(saved):
            if own is None:
                del module.forward
            else:
                module.forward = own
