"""The editor contract: ``edit(cases)`` changes the model and returns a handle that can undo it.

Single editing is ``edit([case])`` then ``handle.revert()``; continual editing is repeated ``edit``
without reverting. Gradient-based editors take an ``Objective`` and know nothing about which loss
runs. An editor declares ``first_layer``, the lowest decoder block whose output its edits can change,
so evaluation can reuse the unedited model's activations below it.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import torch
from transformers import PreTrainedTokenizerBase

from overtone.benchmarks.cases import EditCase
from overtone.editors.parallel import CaseEdits, CaseMemory
from overtone.editors.reports import EditStats, StepCallback
from overtone.models.loading import LoadedModel
from overtone.objectives import Objective, OverToneConfig

log = logging.getLogger(__name__)


class EditError(RuntimeError):
    """An edit could not be carried out; the model is left as it was before the edit."""


# Tokens of ``prompt + " " + target`` an editor accepts by default. The reference toolkit bounds FT at 40
# and LoRA at 30 (a truncation bound there); 512 admits every shipped benchmark with room for tokenizers
# less thrifty than SmolLM2's (WikiBio's longest edit: 226 SmolLM2 tokens, 295 with the tests' 400-token
# vocabulary) and refuses the pathological (a 6,000-character target: ~1,500 tokens) in seconds.
DEFAULT_MAX_LENGTH = 512


def max_length_field() -> Any:
    """The ``max_length`` setting every editor config carries."""
    return field(default=DEFAULT_MAX_LENGTH, metadata={
        "help": "max tokens of prompt + target per edit; longer inputs are refused (or cut with --truncate)"})


def config_problems(editor: str, problems: list[str], steps: int | None = None, lr: float | None = None) -> None:
    """Raise every problem of an editor's config in one message naming the editor, the checks of the step
    budget and learning rate that every gradient editor makes first (None: a value its preset fills in)."""
    budget = [f"steps must be >= 1, got {steps}"] if steps is not None and steps < 1 else []
    budget += [f"lr must be > 0, got {lr}"] if lr is not None and lr <= 0 else []
    if budget + problems:
        raise ValueError(f"{editor}: " + "; ".join(budget + problems))


def fit_length(tokenizer: PreTrainedTokenizerBase, case: EditCase, max_length: int | None, truncate: bool,
               editor: str) -> EditCase:
    """``case`` if each request's ``prompt + " " + target`` has at most ``max_length`` tokens.

    Longer requests raise ``ValueError`` naming the case and its length, or with ``truncate`` keep
    their first ``max_length`` tokens (the target is cut, as a tokenizer's right truncation would);
    a prompt that alone fills ``max_length`` cannot be cut that way and is refused.
    """
    if max_length is None:
        return case
    fitted = []
    for request in case.requests:
        text = f"{request.prompt} {request.target}"
        enc = tokenizer(text, return_offsets_mapping=True)
        length = len(enc["input_ids"])
        if length <= max_length:
            fitted.append(request)
            continue
        where = f"case {request.case_id}: prompt + target has {length} tokens, more than {editor}'s max_length " \
                f"{max_length}"
        if not truncate:
            raise ValueError(f"{where}; raise it (--set max_length=N) or cut the input with --truncate")
        keep = max_length
        while True:  # a cut text can tokenise into more tokens than the cut made; then cut one more
            target = text[len(request.prompt) + 1: enc["offset_mapping"][keep - 1][1]]
            if not target.strip():
                raise ValueError(f"{where}, and the prompt alone fills it: --truncate would leave no target")
            if len(tokenizer(f"{request.prompt} {target}")["input_ids"]) <= max_length:
                break
            keep -= 1
        log.warning("%s: cut to its first %d tokens (--truncate)", where, max_length)
        fitted.append(replace(request, target=target))
    if not case.edits:
        return fitted[0]
    return replace(case, edits=tuple(fitted))


class EditHandle:
    """Undo information of one ``edit`` call; ``revert`` restores the exact previous weights.

    ``restores`` (optional) declares that reverting only puts saved values back into exactly these
    objects: weight tensors, or the state object of an editor that keeps its edits outside the
    weights (``editors.memory.Journal``). ``EditStack`` uses it to drop the undo data of a later edit
    of objects that an earlier edit of the same sequence already saved, so a long sequence does not
    pile up copies.
    """

    def __init__(self, revert: Callable[[], None], first_layer: int, stats: EditStats,
                 restores: Sequence[object] | None = None) -> None:
        self._revert: Callable[[], None] | None = revert
        self.first_layer = first_layer
        self.stats = stats
        self.restores = tuple(restores) if restores is not None else None

    @property
    def active(self) -> bool:
        return self._revert is not None

    def revert(self) -> None:
        """Restore the weights as they were before this edit (a no-op the second time)."""
        if self._revert is not None:
            self._revert()
            self._revert = None

    def release(self) -> None:
        """Drop the undo data without reverting: the caller has another way back (see ``EditStack``)."""
        self._revert = None


class EditStack:
    """The handles of a sequence of edits applied without reverting (continual editing).

    ``revert`` undoes the whole sequence, newest edit first. A pushed handle whose ``restores`` are
    all saved by earlier copy-restoring handles of the stack is released at once: reverting those
    earlier handles puts the same objects back to their values before the sequence, so its own copy
    is never needed. With FT-M, a sequence of T edits thus holds one copy of the edited matrix, not T;
    with WISE, one snapshot of its side memories.
    """

    def __init__(self) -> None:
        self.handles: list[EditHandle] = []
        self._saved: set[int] = set()  # ids of objects restored by a held copy-restoring handle
        self.first_layer: int | None = None  # lowest layer any edit of the sequence can have changed

    def push(self, handle: EditHandle) -> EditHandle:
        layer = handle.first_layer
        self.first_layer = layer if self.first_layer is None else min(self.first_layer, layer)
        if handle.restores is not None and all(id(t) in self._saved for t in handle.restores):
            handle.release()
        else:
            self.handles.append(handle)
            if handle.restores is not None:
                self._saved.update(id(t) for t in handle.restores)
        return handle

    def revert(self) -> None:
        """Undo every edit of the sequence, newest first; the stack is empty afterwards."""
        while self.handles:
            self.handles.pop().revert()
        self._saved.clear()
        self.first_layer = None


@dataclass
class SavedEdit:
    """An editor's live edits as data: what an edit artifact stores (``overtone.artifacts``).

    ``tensors`` are written as safetensors and ``state`` as JSON. ``base`` holds the values, from
    before the edits, of the model parameters the edits change or build on: an artifact stores their
    hashes, never the values, and refuses a model whose values differ. When ``peft_config`` is set,
    ``tensors`` are a peft adapter's state dict and the artifact is also a peft adapter folder.
    """

    tensors: dict[str, torch.Tensor]
    state: dict[str, Any] = field(default_factory=dict)
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    peft_config: Any = None


class UpdateLog:
    """The live edits of an editor that changes weights in place, oldest first, so they can be saved.

    ``begin`` opens an edit's record; when no edit is live it first copies the present values of the
    weights the editor changes (the ``base`` of a saved edit). Closed-form updates go into the open
    record with ``add``. ``revert_to(mark)`` drops the record of an edit and every later one, as
    restoring that edit's weight copy undoes them all (in a sequence ``EditStack`` only reverts the
    first edit's handle).

    The updates are kept while they take no more memory than the weights' change since the base at
    twice their precision (``limit_bytes``); past that (a long stream of MEMIT batches) the later
    updates are dropped (``complete`` turns False), so the log stays bounded and a saved edit is that
    change instead of the updates.
    """

    def __init__(self) -> None:
        self.base: dict[str, torch.Tensor] = {}
        self.edits: list[list[Any] | None] = []  # None: an edit whose updates were dropped, as every later one

    @property
    def limit_bytes(self) -> int:
        """The size of the base's change at twice its precision: what keeping the updates may cost at most."""
        return sum(2 * t.numel() * t.element_size() for t in self.base.values())

    def begin(self, weights: Mapping[str, torch.Tensor]) -> int:
        if not self.edits:
            self.base = {}
        for name, weight in weights.items():
            if name not in self.base:
                self.base[name] = weight.detach().clone()
        self.edits.append([] if self.complete else None)
        return len(self.edits) - 1

    def add(self, update: Any) -> None:
        """Keep ``update`` (a tuple of a weight's name and tensors) in the open edit's record, within the limit."""
        record = self.edits[-1]
        if record is None:
            return
        record.append(update)
        kept = sum(t.numel() * t.element_size() for edit in self.edits if edit for u in edit for t in u
                   if isinstance(t, torch.Tensor))
        if kept > self.limit_bytes:
            self.edits[-1] = None

    def revert_to(self, mark: int) -> None:
        del self.edits[mark:]

    @property
    def complete(self) -> bool:
        """Whether every live edit's updates are kept (else only the weights' change since the base is known)."""
        return all(edit is not None for edit in self.edits)

    @property
    def updates(self) -> list[Any]:
        if not self.complete:
            raise ValueError("the updates of the later live edits were dropped (over the log's limit); save the "
                             "weights' change since the base instead")
        return [update for edit in self.edits for update in edit or ()]


class Editor(ABC):
    """Base class of all editors; subclasses set ``name`` and ``config_class`` and register themselves.

    Saving edits is one method pair: ``saved_edit`` describes the edits applied so far and not
    reverted, ``apply_saved`` applies such a description to a model and returns its handle.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    # True when the edits need the editor's routing at inference (no plain weight change to export).
    needs_routing: ClassVar[bool] = False
    # OverTone's lambda, n and epsilon when this editor hosts it and the user sets none (tuned per editor).
    overtone_defaults: ClassVar[OverToneConfig] = OverToneConfig()
    # Why the editor cannot edit cases side by side (``edit_parallel``); None: it can.
    parallel_refusal: ClassVar[str | None] = "it has no parallel edit"

    def __init__(self, lm: LoadedModel, config: Any, objective: Objective | None = None) -> None:
        self.lm = lm
        self.config = config
        self.objective = objective
        # The unedited model's target logits per request id ([rows, tokens, V], as the editor scores them),
        # for an objective that needs a reference ("w/o dyn") in a sequence of edits: the runner captures
        # them before the sequence's first edit (``runner.bench.capture_references``). Without them an edit
        # takes its own first pass, which is the unedited model's only in single editing.
        self.references: dict[str, torch.Tensor] = {}

    def reference_for(self, cases: Sequence[EditCase], labels: torch.Tensor) -> torch.Tensor | None:
        """The captured reference logits of an edit of ``cases`` scored at ``labels`` [rows, tokens]: each
        case's rows padded to the batch's token count (padded positions are never scored); None when the
        objective needs none or none was captured."""
        if self.objective is None or not self.objective.needs_reference:
            return None
        parts = [self.references.get(case.case_id) for case in cases]
        if any(part is None for part in parts):
            return None
        width = labels.size(1)
        padded = [torch.nn.functional.pad(part, (0, 0, 0, width - part.size(1))) for part in parts if part is not None]
        reference = torch.cat(padded).to(labels.device)
        if reference.shape[:2] != labels.shape:
            raise EditError(f"case {', '.join(c.case_id for c in cases)}: captured reference logits "
                            f"{tuple(reference.shape[:2])} do not match the edit's targets {tuple(labels.shape)}")
        return reference

    @property
    @abstractmethod
    def first_layer(self) -> int:
        """Lowest decoder block whose output an edit by this editor can change."""

    @abstractmethod
    def edit(self, cases: Sequence[EditCase], on_step: StepCallback | None = None,
             steps: int | None = None) -> EditHandle:
        """Apply the edits of ``cases`` (jointly) to the model in place.

        Gradient-based editors call ``on_step`` after every forward pass of their optimisation.
        ``steps``, when given, makes them take exactly that many updates, with no early stop: the
        matched-steps control, which trains one objective for as long as another one trained.
        """

    def edit_parallel(self, cases: Sequence[EditCase], on_step: StepCallback | None = None,
                      steps: Sequence[int | None] | None = None) -> CaseEdits:
        """Edit every case on its own against the present weights, all at once (``editors/parallel.py``).

        Each case gets the steps, stop and result it gets from ``edit([case])``, up to floating-point
        summation order; the model's weights are left unchanged and the edits come back as per-case
        changes. ``steps[i]``, when given, is case i's exact number of updates; ``on_step`` gets one
        ``StepInfo`` per case and pass, as when the case is edited alone.
        """
        raise EditError(f"editor {self.name!r} cannot edit cases in parallel: {self.parallel_refusal}")

    def case_memory(self) -> CaseMemory:
        """Memory one case of ``edit_parallel`` needs (for ``--parallel auto``)."""
        raise EditError(f"editor {self.name!r} cannot edit cases in parallel: {self.parallel_refusal}")

    def describe(self) -> dict[str, Any]:
        """Resolved settings, as written into a run's configuration."""
        return {"name": self.name, **asdict(self.config)}

    @classmethod
    def check_cases(cls, config: Any, tokenizer: PreTrainedTokenizerBase, cases: Sequence[EditCase],
                    truncate: bool = False) -> list[EditCase]:
        """The cases as this editor will edit them, checked with the tokenizer alone (before any model work).

        Raises ``ValueError`` naming the case for an input the editor refuses: longer than ``max_length``
        (unless ``truncate``), or what ``check_request`` rejects.
        """
        max_length = getattr(config, "max_length", None)
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens, got {max_length}")
        fitted = [fit_length(tokenizer, case, max_length, truncate, cls.name) for case in cases]
        for case in fitted:
            for request in case.requests:
                cls.check_request(config, tokenizer, request)
        return fitted

    @classmethod
    def check_request(cls, config: Any, tokenizer: PreTrainedTokenizerBase, request: EditCase) -> None:
        """Raise ``ValueError`` naming the case if this editor cannot edit ``request`` (nothing to check here)."""
        return None

    def saved_edit(self) -> SavedEdit:
        """The edits this editor has applied and not reverted, as tensors, JSON state and their base."""
        raise NotImplementedError(f"the {self.name} editor cannot save its edits")

    @classmethod
    def apply_saved(cls, lm: LoadedModel, config: Any, saved: SavedEdit,
                    objective: Objective | None = None) -> EditHandle:
        """Apply ``saved`` (made by this editor with ``config``) to ``lm``; the handle reverts it bit for bit.

        The caller has checked that ``lm`` holds the saved edit's base values.
        """
        raise NotImplementedError(f"the {cls.name} editor cannot apply saved edits")

    def resume_state(self, saved: SavedEdit) -> None:
        """Take over the accumulated state (a key cache, running statistics) of ``saved``, an edit of this
        editor just applied to its model with ``apply_saved``, so that an edit stream resumed from its
        checkpoint goes on as if it had never stopped (runner/stream.py). An editor whose next edit depends
        on the weights alone keeps nothing (this default)."""
        return None


def refuse_second_peft(lm: LoadedModel, editor: str) -> None:
    """Peft-based edits (LoRA, MELO) own the peft wrapping of a model: one at a time."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) for m in lm.model.modules()):
        raise ValueError(f"cannot apply a saved {editor} edit: the model already carries peft adapters (a LoRA or "
                         "MELO edit); apply one peft-based edit per model, or export the first and edit the export")
