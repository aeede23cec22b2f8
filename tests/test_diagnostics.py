"""Token-level traces: the greedy-token definition, UD, probe losses, and that recording changes nothing."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_same_state, state

from overtone.diagnostics import CaseTrace, TraceError, TraceRecorder, load_traces, save_traces, trace_edit
from overtone.editors import FTM, FTMConfig, StepInfo, make_editor
from overtone.evaluation import Evaluator
from overtone.objectives import CrossEntropy, OverTone, OverToneConfig
from overtone.tokens import encode_pairs


def full_log_probs(lm, prompt: str, answer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, V] log-probabilities at the answer positions and the answer ids, from a plain HF forward."""
    batch = encode_pairs(lm.tokenizer, [prompt], [answer])
    with torch.no_grad():
        logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[0]
    n = int(batch.label_mask.sum())
    return torch.log_softmax(logits[batch.positions[0, :n]].float(), dim=-1), batch.labels[0, :n]


def probe_nll(lm, prompt: str, answer: str) -> float:
    log_probs, labels = full_log_probs(lm, prompt, answer)
    return -log_probs.gather(-1, labels[:, None]).mean().item()


def test_greedy_token_is_the_unedited_argmax_in_the_edit_context(tiny_llama, zsre_cases):
    case = zsre_cases[0]
    (trace,) = trace_edit(FTM(tiny_llama, FTMConfig(layer=2, steps=1), CrossEntropy()), Evaluator(tiny_llama), [case])
    log_probs, labels = full_log_probs(tiny_llama, case.prompt, case.target)
    assert trace.label_ids == labels.tolist()
    assert trace.greedy_ids == log_probs.argmax(-1).tolist()
    assert trace.greedy_log_prob == pytest.approx(log_probs.max(-1).values.tolist(), abs=1e-5)
    # position 1 is also the first token of the unedited model's greedy completion of the prompt
    prompt_ids = tiny_llama.tokenizer(case.prompt, return_tensors="pt")["input_ids"]
    generated = tiny_llama.model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                          max_new_tokens=1, do_sample=False,
                                          pad_token_id=tiny_llama.tokenizer.pad_token_id)
    assert trace.greedy_ids[0] == generated[0, -1].item()


def test_trace_rows_match_independent_forwards(tiny_llama, zsre_cases):
    case = zsre_cases[1]
    editor = FTM(tiny_llama, FTMConfig(layer=2, lr=0.05, steps=5, stop_loss=0.0), OverTone())
    evaluator = Evaluator(tiny_llama)
    before = state(tiny_llama)
    pre_gen = probe_nll(tiny_llama, case.rephrases[0], case.target)
    recorder = TraceRecorder(editor, evaluator, [case])
    handle = editor.edit([case], on_step=recorder)
    (trace,) = recorder.finish(handle.stats)
    # the weights after the last update: checked against plain forwards of the edited model
    log_probs, labels = full_log_probs(tiny_llama, case.prompt, case.target)
    final_lp = log_probs.gather(-1, labels[:, None]).squeeze(-1).tolist()
    post_gen = probe_nll(tiny_llama, case.rephrases[0], case.target)
    (por,) = next(iter(case.portability.values()))
    post_por = probe_nll(tiny_llama, por.prompt, por.answer)
    handle.revert()

    # the editor's own pass after its last update is the final row (no extra row needed)
    assert trace.steps == [0, 1, 2, 3, 4, 5] and not trace.final_extra
    assert trace.label == "OverTone" and trace.editor_name == "ft-m"
    assert trace.label_log_prob[-1] == pytest.approx(final_lp, abs=1e-4)
    assert trace.probe_loss["gen"][0] == pytest.approx(pre_gen, abs=1e-4)
    assert trace.probe_loss["gen"][-1] == pytest.approx(post_gen, abs=1e-4)
    assert trace.probe_loss["por"][-1] == pytest.approx(post_por, abs=1e-4)
    assert set(trace.probe_loss) == {"rel", "gen", "por", "loc"}
    for row, lp in zip(trace.ud, trace.label_log_prob, strict=True):
        assert row == pytest.approx([g - x for g, x in zip(trace.greedy_log_prob, lp, strict=True)], abs=1e-5)
    # the rows seen by the optimiser carry its own per-token losses (mean reduction = its scalar loss)
    for row, loss in zip(trace.token_loss, handle.stats.losses, strict=True):
        assert sum(row) / len(row) == pytest.approx(loss, rel=1e-5)
    assert_same_state(tiny_llama, before)


def test_mixture_flags_are_the_objectives_decision(tiny_llama, zsre_cases):
    case = zsre_cases[2]
    objective = OverTone(OverToneConfig(lam=0.3, n_sigma=1.0, epsilon=0.0))
    (trace,) = trace_edit(FTM(tiny_llama, FTMConfig(layer=2, steps=1), objective), Evaluator(tiny_llama), [case])
    log_probs, labels = full_log_probs(tiny_llama, case.prompt, case.target)
    _, mixed, *_ = objective.target(log_probs, labels)
    assert trace.mixed[0] == mixed.tolist()
    (ce,) = trace_edit(FTM(tiny_llama, FTMConfig(layer=2, steps=1), CrossEntropy()), Evaluator(tiny_llama), [case])
    assert not any(any(r) for r in ce.mixed) and not any(any(r) for r in ce.clipped)


def test_ud_starts_at_zero_exactly_where_the_label_is_the_greedy_token(tiny_llama, zsre_cases):
    case = zsre_cases[3]
    evaluator = Evaluator(tiny_llama)
    (trace,) = trace_edit(FTM(tiny_llama, FTMConfig(layer=2, steps=2), CrossEntropy()), evaluator, [case])
    assert min(trace.ud[0]) >= 0  # log p0(greedy) >= log p0(label)
    # fit the target hard, keep the edit: for this model the target *is* the greedy continuation
    fit = FTM(tiny_llama, FTMConfig(layer=2, lr=0.3, steps=25, stop_loss=1e-3), CrossEntropy()).edit([case])
    (again,) = trace_edit(FTM(tiny_llama, FTMConfig(layer=3, steps=2), CrossEntropy()), evaluator, [case])
    fit.revert()
    assert again.greedy_ids == again.label_ids
    assert again.ud[0] == [0.0] * len(again.tokens)
    mismatch = [g != y for g, y in zip(trace.greedy_ids, trace.label_ids, strict=True)]
    assert all(ud > 1e-6 for ud, m in zip(trace.ud[0], mismatch, strict=True) if m)


def test_clipped_tokens_and_early_stop_leave_no_extra_row(tiny_llama, zsre_cases):
    case = zsre_cases[4]
    editor = FTM(tiny_llama, FTMConfig(layer=2, stop_when_clipped=True), OverTone(OverToneConfig(epsilon=1e6)))
    (trace,) = trace_edit(editor, Evaluator(tiny_llama), [case])
    assert trace.steps == [0] and not trace.final_extra and all(trace.clipped[0])


@pytest.mark.parametrize("editor", ["ft-m", "lora"])
def test_recording_changes_nothing_in_the_edit(tiny_llama, zsre_cases, editor):
    """Also with adapter dropout: the recorder's probe passes run in eval mode and draw no random numbers."""
    case = zsre_cases[5]
    settings = dict(layer=1, lr=0.05, steps=6, stop_loss=0.0) if editor == "ft-m" else dict(
        variant="lora", dropout=0.3, lr=0.03, steps=6)
    plain = make_editor(editor, tiny_llama, OverTone(), **settings).edit([case])
    weights = state(tiny_llama)
    plain.revert()
    recorder = TraceRecorder(make_editor(editor, tiny_llama, OverTone(), **settings), Evaluator(tiny_llama), [case])
    traced = recorder.editor.edit([case], on_step=recorder)
    (trace,) = recorder.finish(traced.stats)
    assert traced.stats.losses == plain.stats.losses
    assert all(torch.equal(v, tiny_llama.model.state_dict()[k]) for k, v in weights.items())
    gen = probe_nll(tiny_llama, case.rephrases[0], case.target)
    traced.revert()
    assert trace.probe_loss["gen"][-1] == pytest.approx(gen, abs=1e-4)


def test_joint_edit_traces_each_case_from_its_own_row(tiny_llama, zsre_cases):
    cases = zsre_cases[6:8]
    traces = trace_edit(FTM(tiny_llama, FTMConfig(layer=2, steps=3), CrossEntropy()), Evaluator(tiny_llama), cases)
    for case, trace in zip(cases, traces, strict=True):
        _, labels = full_log_probs(tiny_llama, case.prompt, case.target)
        assert trace.case_id == case.case_id and trace.label_ids == labels.tolist()
        assert len(trace.steps) == len(trace.ud) == len(trace.probe_loss["gen"])


def test_clear_errors(tiny_llama, zsre_cases):
    editor = FTM(tiny_llama, FTMConfig(layer=2, steps=2), CrossEntropy())
    recorder = TraceRecorder(editor, Evaluator(tiny_llama), [zsre_cases[0]])
    with pytest.raises(TraceError, match=r"case zsre/1 was edited but not given to the TraceRecorder"):
        editor.edit([zsre_cases[1]], on_step=recorder)
    with pytest.raises(TraceError, match="no step was recorded"):
        TraceRecorder(editor, Evaluator(tiny_llama), [zsre_cases[0]]).finish(editor.edit([zsre_cases[0]]).stats)
    batch = encode_pairs(tiny_llama.tokenizer, [zsre_cases[0].prompt], [zsre_cases[0].target])
    logits = torch.zeros((*batch.labels.shape, len(tiny_llama.tokenizer)))
    wrong = batch.labels.clone()
    wrong[0, 0] = (wrong[0, 0] + 1) % logits.size(-1)
    info = StepInfo(step=0, loss=0.0, output=CrossEntropy()(logits, wrong), cases=[zsre_cases[0]], logits=logits,
                    labels=wrong)
    with pytest.raises(TraceError, match=r"trains the tokens .* but evaluation scores"):
        recorder(info)


def test_traces_round_trip_and_bad_files_are_named(tmp_path, tiny_llama, zsre_cases):
    traces = trace_edit(FTM(tiny_llama, FTMConfig(layer=2, steps=2), OverTone()), Evaluator(tiny_llama),
                        zsre_cases[:1])
    path = tmp_path / "trace.json"
    save_traces(path, traces, {"model": {"name": "tiny"}})
    meta, loaded = load_traces(path)
    assert meta == {"model": {"name": "tiny"}} and loaded == traces and isinstance(loaded[0], CaseTrace)
    data = json.loads(path.read_text())
    data["traces"][0]["ud"] = data["traces"][0]["ud"][:-1]
    path.write_text(json.dumps(data))
    with pytest.raises(TraceError, match=r"trace 0: case zsre/0: per-token and per-step lists differ"):
        load_traces(path)
    path.write_text("{}")
    with pytest.raises(TraceError, match="not an overtone trace"):
        load_traces(path)
    path.write_text("not json")
    with pytest.raises(TraceError, match="cannot read a trace"):
        load_traces(path)


def test_final_row_of_a_static_target_uses_the_unedited_logits(tiny_llama, zsre_cases):
    case = zsre_cases[8]
    objective = OverTone(OverToneConfig(dynamic=False, epsilon=0.0))
    editor = FTM(tiny_llama, FTMConfig(layer=2, lr=0.05, steps=3, stop_loss=0.0), objective)
    unedited, labels = full_log_probs(tiny_llama, case.prompt, case.target)
    recorder = TraceRecorder(editor, Evaluator(tiny_llama), [case])
    handle = editor.edit([case], on_step=recorder)
    (trace,) = recorder.finish(handle.stats)
    final, _ = full_log_probs(tiny_llama, case.prompt, case.target)
    handle.revert()
    expected = objective(final[None], labels[None], unedited[None]).token_loss[0]
    assert not trace.final_extra and trace.token_loss[-1] == pytest.approx(expected.tolist(), abs=1e-4)
