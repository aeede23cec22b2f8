"""Token-level traces of an edit: heterogeneous token overfitting made visible (paper Sec. 2.3).

A ``TraceRecorder`` is an ``on_step`` callback. For every edited case and every forward pass of the
editor it records, per target token: the log-likelihood of the label, the underfitting degree, the
objective's per-token loss, whether the token was clipped and whether the smoothed mixture (rather
than the one-hot fallback) was its target; and per step the loss of the case's probes (Fig. 1).

Definitions, for the edit text ``prompt + " " + target`` with target tokens y_1..y_n and teacher-forced
contexts c_i = (prompt, y_<i):

* **The unedited model's greedy token** at position i is g_i = argmax_v p_0(v | c_i): the token that
  greedy decoding with the unedited weights would emit next *in the edit's own context*, i.e. after
  the prompt and the first i-1 target tokens. For i = 1 it is the first token of the unedited
  model's greedy completion of the prompt; later positions condition on the target prefix, not on
  the model's own earlier choices, so that g_i and y_i are predicted from the same context and the
  two log-likelihoods below compare like with like. (A free-running greedy sequence stops lining up
  with the target as soon as the two differ.) It is read from the editor's first forward pass,
  which runs the unedited weights.
* **Underfitting degree** (Sec. 2.3): UD_i(t) = log p_0(g_i | c_i) - log p_t(y_i | c_i), the
  pre-edit log-likelihood of the greedy token minus the running log-likelihood of the label after
  t optimiser updates, in nats. UD_i(0) >= 0, with equality exactly where y_i is the greedy token;
  UD_i(t) < 0 means the edited model is now surer of y_i than the unedited model was of its own
  best guess: the token is overfitted.
* **Probe loss** (Fig. 1): the mean negative log-likelihood per answer token of each probe's answer
  given its prompt, averaged like the metrics (``Evaluator.losses``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import EditHandle, Editor
from overtone.editors.reports import EditStats, StepInfo
from overtone.evaluation.teacher_forced import Evaluator, ProbeBatch
from overtone.models.replay import SuffixCache
from overtone.objectives import IGNORE_INDEX, objective_label

if TYPE_CHECKING:
    from overtone.editors.parallel import CaseEdits

TRACE_FILE = "trace.json"
TRACE_FORMAT = "overtone-trace"
TRACE_VERSION = 1
DIGITS = 6  # rounding of stored floats: far below any visible difference, keeps the JSON readable


class TraceError(ValueError):
    """A trace cannot be recorded or read."""


def _floats(values: torch.Tensor) -> list[float]:
    return [round(float(v), DIGITS) for v in values.tolist()]


@dataclass
class CaseTrace:
    """One case edited with one objective, per target token and per recorded step.

    Row r of every per-step list was recorded with the weights after ``steps[r]`` optimiser updates.
    Rows come from the editor's own forward passes; when the editor's last forward pass preceded an
    update (it ran out of steps), one more row with the final weights is added (``final_extra``),
    its token statistics computed by the same objective.
    """

    case_id: str
    prompt: str
    target: str
    editor: dict[str, Any]  # Editor.describe()
    objective: dict[str, Any]  # Objective.config()
    tokens: list[str]  # target tokens y_i, each decoded alone
    label_ids: list[int]
    greedy_ids: list[int]  # g_i, the unedited model's greedy token (module docstring)
    greedy_tokens: list[str]
    greedy_log_prob: list[float]  # log p_0(g_i | c_i)
    steps: list[int] = field(default_factory=list)
    label_log_prob: list[list[float]] = field(default_factory=list)  # [row][token] log p_t(y_i | c_i)
    ud: list[list[float]] = field(default_factory=list)  # [row][token] underfitting degree, nats
    token_loss: list[list[float]] = field(default_factory=list)  # [row][token] the objective's loss
    clipped: list[list[bool]] = field(default_factory=list)  # [row][token] sent no gradient
    mixed: list[list[bool]] = field(default_factory=list)  # [row][token] target was the mixture, not one-hot
    probe_loss: dict[str, list[float | None]] = field(default_factory=dict)  # metric -> [row], nats/token
    final_extra: bool = False

    @property
    def label(self) -> str:
        return objective_label(self.objective)

    @property
    def editor_name(self) -> str:
        return str(self.editor.get("name", "-"))

    def add_row(self, step: int, label_log_prob: torch.Tensor, token_loss: torch.Tensor, clipped: torch.Tensor,
                mixed: torch.Tensor, probe_loss: dict[str, float | None]) -> None:
        lp = _floats(label_log_prob.float())
        self.steps.append(step)
        self.label_log_prob.append(lp)
        self.ud.append([round(g - x, DIGITS) for g, x in zip(self.greedy_log_prob, lp, strict=True)])
        self.token_loss.append(_floats(token_loss))
        self.clipped.append([bool(v) for v in clipped.tolist()])
        self.mixed.append([bool(v) for v in mixed.tolist()])
        for metric, value in probe_loss.items():
            self.probe_loss.setdefault(metric, []).append(None if value is None else round(value, DIGITS))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "trace") -> CaseTrace:
        known = {f.name for f in fields(cls)}
        missing = sorted(known - set(data) - {"final_extra"})
        if missing:
            raise TraceError(f"{where}: missing field(s) {', '.join(missing)}")
        trace = cls(**{k: v for k, v in data.items() if k in known})
        n, rows = len(trace.tokens), len(trace.steps)
        per_token = (trace.label_ids, trace.greedy_ids, trace.greedy_tokens, trace.greedy_log_prob)
        per_row = (trace.label_log_prob, trace.ud, trace.token_loss, trace.clipped, trace.mixed)
        if any(len(v) != n for v in per_token) or any(len(v) != rows for v in per_row) \
                or any(len(r) != n for v in per_row for r in v) \
                or any(len(v) != rows for v in trace.probe_loss.values()):
            raise TraceError(f"{where}: case {trace.case_id}: per-token and per-step lists differ in length")
        return trace


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode for the recorder's probe passes, then exactly the previous modes.

    Editors may train with dropout on (LoRA's adapter dropout); a probe pass in training mode would be
    noisy and would draw from the random stream the edit uses, so recording would change the edit.
    """
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True


@dataclass
class _CaseState:
    trace: CaseTrace
    probes: ProbeBatch
    cache: SuffixCache | None
    labels: torch.Tensor  # [n] target token ids, as evaluation tokenises them
    unedited_logits: torch.Tensor | None = None  # [n, V] from the editor's first pass


class TraceRecorder:
    """An ``on_step`` callback that records a ``CaseTrace`` for each case of one ``edit`` call.

    Build it *before* the edit (it runs the unedited model on every case's probes), pass it as
    ``on_step``, then call ``finish(handle.stats)`` before reverting. Probe losses at each step reuse
    the unedited pass's activations below ``editor.first_layer``, as evaluation does.
    """

    def __init__(self, editor: Editor, evaluator: Evaluator, cases: Sequence[EditCase]) -> None:
        if editor.objective is None:
            raise TraceError(f"editor {editor.name!r} has no training objective, so there are no steps to trace")
        self.editor = editor
        self.evaluator = evaluator
        tokenizer = evaluator.lm.tokenizer
        self._states: dict[str, _CaseState] = {}
        for case in cases:
            probes = evaluator.probes(case)
            if probes.groups[0] != ("rel", "rewrite"):
                raise TraceError(f"case {case.case_id}: the first probe row is not the edit prompt")
            unedited = evaluator.answer_logits(probes, record_from=editor.first_layer)
            labels = probes.batch.labels[0, : unedited.counts[0]]
            trace = CaseTrace(
                case_id=case.case_id, prompt=case.prompt, target=case.target, editor=editor.describe(),
                objective=editor.objective.config(),
                tokens=[tokenizer.decode([t]) for t in labels.tolist()], label_ids=labels.tolist(),
                greedy_ids=[], greedy_tokens=[], greedy_log_prob=[],  # from the editor's first pass
            )
            self._states[case.case_id] = _CaseState(trace, probes, unedited.cache, labels)

    def _set_unedited(self, state: _CaseState, logits: torch.Tensor) -> None:
        """Greedy tokens and reference logits from the editor's first pass, which runs the unedited weights.

        Taking them from the same forward pass as the running log-likelihoods makes UD(0) exactly 0
        where the label is the greedy token (a separately batched pass differs by float rounding).
        """
        trace = state.trace
        state.unedited_logits = logits.float()
        best = torch.log_softmax(state.unedited_logits, dim=-1).max(dim=-1)
        trace.greedy_ids = best.indices.tolist()
        trace.greedy_tokens = [self.evaluator.lm.tokenizer.decode([t]) for t in trace.greedy_ids]
        trace.greedy_log_prob = _floats(best.values)

    def _probe_losses(self, state: _CaseState, weights: Callable[[], AbstractContextManager[Any]] | None = None
                      ) -> tuple[dict[str, float | None], torch.Tensor]:
        """Probe losses with the current weights (inside ``weights()`` for a parallel edit), and the logits of
        the edit prompt's target tokens."""
        with _eval_mode(self.evaluator.lm.model), (weights or contextlib.nullcontext)():
            answer = self.evaluator.answer_logits(state.probes, replay=state.cache)
        return self.evaluator.losses(state.probes, answer), answer.rows()[0]

    @torch.no_grad()
    def __call__(self, info: StepInfo) -> None:
        log_probs = info.label_log_probs()
        for i, case in enumerate(info.cases):
            state = self._states.get(case.case_id)
            if state is None:
                raise TraceError(f"case {case.case_id} was edited but not given to the TraceRecorder")
            mask = info.labels[i].ne(IGNORE_INDEX)
            if not torch.equal(info.labels[i][mask].cpu(), state.labels.cpu()):
                raise TraceError(
                    f"case {case.case_id}: editor {self.editor.name!r} trains the tokens "
                    f"{info.labels[i][mask].tolist()} but evaluation scores {state.labels.tolist()}; "
                    "a trace needs both to tokenise the target alike")
            if not state.trace.steps:
                self._set_unedited(state, info.logits[i][mask])
            probe_loss, _ = self._probe_losses(state, info.weights)
            out = info.output
            state.trace.add_row(info.step, log_probs[i][mask], out.token_loss[i][mask], out.clipped[i][mask],
                                out.mixed[i][mask], probe_loss)

    def finish(self, stats: EditStats) -> list[CaseTrace]:
        """The traces, after adding a row for the final weights if no forward pass has seen them yet."""
        for state in self._states.values():
            self._finish(state, stats)
        return [state.trace for state in self._states.values()]

    def finish_parallel(self, edits: CaseEdits) -> list[CaseTrace]:
        """``finish`` for a parallel edit: each case's final row is read with its own edit (``edits.only``)."""
        for i, (case, stats) in enumerate(zip(edits.cases, edits.stats, strict=True)):
            self._finish(self._states[case.case_id], stats, lambda i=i: edits.only(i))
        return [state.trace for state in self._states.values()]

    @torch.no_grad()
    def _finish(self, state: _CaseState, stats: EditStats,
                weights: Callable[[], AbstractContextManager[Any]] | None = None) -> None:
        """Add a row for the final weights of ``state``'s case if no forward pass has seen them yet."""
        objective = self.editor.objective
        assert objective is not None
        trace = state.trace
        if not trace.steps:
            raise TraceError(f"case {trace.case_id}: no step was recorded; pass the recorder as on_step")
        if trace.steps[-1] >= stats.steps:
            return
        probe_loss, logits = self._probe_losses(state, weights)
        assert state.unedited_logits is not None  # set with the first recorded step
        reference = state.unedited_logits[None] if objective.needs_reference else None
        out = objective(logits[None].float(), state.labels[None], reference)
        log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, state.labels[:, None]).squeeze(-1)
        trace.add_row(stats.steps, log_probs, out.token_loss[0], out.clipped[0], out.mixed[0], probe_loss)
        trace.final_extra = True


def trace_edit(editor: Editor, evaluator: Evaluator, cases: Sequence[EditCase]) -> list[CaseTrace]:
    """Edit ``cases`` jointly while recording their traces, then revert the edit (bit-exact)."""
    recorder = TraceRecorder(editor, evaluator, cases)
    handle = editor.edit(cases, on_step=recorder)
    try:
        return recorder.finish(handle.stats)
    finally:
        handle.revert()


def trace_parallel(editor: Editor, evaluator: Evaluator, cases: Sequence[EditCase]) -> list[CaseTrace]:
    """Edit each of ``cases`` on its own, all at once (``Editor.edit_parallel``), recording their traces: the
    traces of ``trace_edit`` on each case alone, up to floating-point summation order. The model is unchanged."""
    recorder = TraceRecorder(editor, evaluator, cases)
    return recorder.finish_parallel(editor.edit_parallel(cases, on_step=recorder))


class TraceCollector:
    """Records the trace of every edit call of a run: an ``EditObserver`` (runner/bench.py), so ``overtone
    trace`` edits and scores its cases through the runner like ``bench`` (records, divergence, a run
    directory) and gets each edit's trace besides."""

    def __init__(self) -> None:
        self.traces: list[CaseTrace] = []
        self._recorder: TraceRecorder | None = None
        self._evaluator: Evaluator | None = None

    def on_step(self, editor: Editor, cases: Sequence[EditCase]) -> TraceRecorder:
        if self._evaluator is None or self._evaluator.lm is not editor.lm:
            self._evaluator = Evaluator(editor.lm)
        self._recorder = TraceRecorder(editor, self._evaluator, cases)
        return self._recorder

    def edited(self, result: EditHandle | CaseEdits) -> None:
        assert self._recorder is not None, "edited() without on_step()"
        if isinstance(result, EditHandle):
            self.traces += self._recorder.finish(result.stats)
        else:
            self.traces += self._recorder.finish_parallel(result)
        self._recorder = None


def save_traces(path: Path | str, traces: Sequence[CaseTrace], meta: dict[str, Any]) -> None:
    """Write ``traces`` and run metadata (model, dataset, ...) as one JSON file."""
    payload = {"format": TRACE_FORMAT, "version": TRACE_VERSION, **meta, "traces": [t.as_dict() for t in traces]}
    Path(path).write_text(json.dumps(payload, indent=1, ensure_ascii=False))


def load_traces(path: Path | str) -> tuple[dict[str, Any], list[CaseTrace]]:
    """(metadata, traces) of a file written by ``save_traces``; a clear error for anything else."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TraceError(f"{path}: cannot read a trace ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != TRACE_FORMAT:
        raise TraceError(f"{path}: not an overtone trace (no format {TRACE_FORMAT!r})")
    if data.get("version") != TRACE_VERSION:
        raise TraceError(f"{path}: trace version {data.get('version')!r}, this overtone reads {TRACE_VERSION}")
    traces = [CaseTrace.from_dict(t, f"{path} trace {i}") for i, t in enumerate(data.get("traces", []))]
    if not traces:
        raise TraceError(f"{path}: holds no traces")
    meta = {k: v for k, v in data.items() if k not in ("format", "version", "traces")}
    return meta, traces
