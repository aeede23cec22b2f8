"""Continual editing: chunks of T edits in sequence, evaluation timing, replay validity, flat memory, resume."""

from __future__ import annotations

import gc

import pytest
import torch
from helpers import assert_same_state, counting_ftm, state

from overtone.benchmarks.cases import EditCase
from overtone.editors import EditHandle, Editor, EditStack, EditStats, FTMConfig
from overtone.evaluation import Evaluator
from overtone.models import replay
from overtone.objectives import CrossEntropy, OverTone, OverToneConfig
from overtone.runner import ResultStore, RunError, edit_and_score, edit_chunk, read_run, run_continual, summarize

CONFIG = {"editor": {"name": "ft-m"}, "protocol": "continual", "sequence": 3, "eval_timing": "end"}


ftm = counting_ftm


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage reachable from Python."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":  # type(): no __class__ lookups
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_stack_keeps_one_copy_of_a_matrix_edited_many_times_and_reverts_bit_exact(tiny_llama, zsre_cases):
    before = state(tiny_llama)
    editor, stack = ftm(tiny_llama), EditStack()
    weight = tiny_llama.adapter.weight("mlp_out", 2)
    sizes = []
    for i, case in enumerate(zsre_cases[:8]):
        stack.push(editor.edit([case]))
        if i in (1, 7):
            sizes.append(live_tensor_bytes())
    # six more edits of the same matrix hold no extra copy of it (a copy is 8 KiB here)
    assert abs(sizes[1] - sizes[0]) < weight.numel() * weight.element_size()
    assert len(stack.handles) == 1 and stack.first_layer == 2
    assert not torch.equal(weight, before["model.layers.2.mlp.down_proj.weight"])
    stack.revert()
    assert_same_state(tiny_llama, before)
    assert stack.handles == [] and stack.first_layer is None


def test_stack_keeps_handles_that_do_more_than_copy_and_reverts_newest_first():
    order = []
    stack = EditStack()
    tensor = torch.zeros(2)
    for name, restores in (("copy", (tensor,)), ("other", None), ("copy-again", (tensor,))):
        stack.push(EditHandle(lambda n=name: order.append(n), first_layer=3, stats=EditStats(), restores=restores))
    assert [h.restores is None for h in stack.handles] == [False, True]  # "copy-again" was released
    stack.revert()
    assert order == ["other", "copy"]


def test_end_timing_evaluates_every_case_on_the_final_model(tiny_llama, zsre_cases):
    before = state(tiny_llama)
    cases = zsre_cases[:3]
    editor, evaluator = ftm(tiny_llama), Evaluator(tiny_llama)
    records = edit_chunk(editor, evaluator, cases, "end")
    assert_same_state(tiny_llama, before)
    assert editor.edited == [c.case_id for c in cases]
    # by hand: pre on the unedited model, all three edits, then each case evaluated
    pres = [evaluator.before(c, record_from=2) for c in cases]
    handles = [editor.edit([c]) for c in cases]
    expected = [evaluator.after(p, replay=False) for p in pres]
    for h in reversed(handles):
        h.revert()
    for record, want in zip(records, expected, strict=True):
        assert record["post"] == want["post"] and record["pre"] == want["pre"]
    # the pre metrics are the unedited model's, as in single editing
    assert [r["pre"] for r in records] == [edit_and_score(editor, evaluator, c)["pre"] for c in cases]


def test_after_each_timing_evaluates_each_case_right_after_its_edit(tiny_llama, zsre_cases):
    cases = zsre_cases[:3]
    editor, evaluator = ftm(tiny_llama, lr=0.3, steps=5), Evaluator(tiny_llama)  # strong enough to interfere
    after_each = edit_chunk(editor, evaluator, cases, "after-each")
    end = edit_chunk(editor, evaluator, cases, "end")
    single = edit_and_score(editor, evaluator, cases[0])
    assert after_each[0]["post"] == single["post"]  # only its own edit was applied
    assert after_each[-1]["post"] == end[-1]["post"]  # the last case sees the same model either way
    assert after_each[0]["post"] != end[0]["post"]  # two later edits changed what case 0 sees
    with pytest.raises(ValueError, match="unknown eval timing 'later'"):
        edit_chunk(editor, evaluator, cases, "later")


class TwoLayerEditor(Editor):
    """Edits at layer 2 first, then at layer 1: the second edit invalidates activations recorded at layer 2."""

    name = "two-layer"
    config_class = FTMConfig

    def __init__(self, lm):
        super().__init__(lm, FTMConfig(), CrossEntropy())
        self.editors = [ftm(lm, layer=2), ftm(lm, layer=1)]
        self.calls = 0

    @property
    def first_layer(self) -> int:
        return 2  # what it declares for recording; its second edit goes lower

    def edit(self, cases, on_step=None, steps=None) -> EditHandle:
        self.calls += 1
        return self.editors[(self.calls - 1) % 2].edit(cases, on_step, steps)


def test_suffix_replay_is_used_only_when_every_edit_of_the_chunk_is_above_the_recorded_layer(
        tiny_llama, zsre_cases, monkeypatch):
    replays = []
    real = replay.forward_suffix
    monkeypatch.setattr("overtone.evaluation.teacher_forced.forward_suffix",
                        lambda adapter, cache: replays.append(cache.start) or real(adapter, cache))
    evaluator = Evaluator(tiny_llama)
    edit_chunk(ftm(tiny_llama), evaluator, zsre_cases[:2])
    assert replays == [2, 2]
    replays.clear()
    editor = TwoLayerEditor(tiny_llama)
    records = edit_chunk(editor, evaluator, zsre_cases[:2], "after-each")
    assert replays == [2]  # case 0, evaluated after the layer-2 edit only; case 1 needs a full pass
    # the full pass sees the layer-1 edit: the same as evaluating by hand with both edits applied
    pre = evaluator.before(zsre_cases[1], record_from=2)
    handles = [e.edit([c]) for e, c in zip(editor.editors, zsre_cases[:2], strict=True)]
    want = evaluator.after(pre, replay=False)
    stale = evaluator.after(pre, replay=True)  # what a wrongly used replay would report
    for h in reversed(handles):
        h.revert()
    assert records[1]["post"] == want["post"] != stale["post"]


def test_memory_is_flat_across_chunks_and_weights_come_back(tmp_path, tiny_llama, zsre_cases):
    before = state(tiny_llama)
    sizes = []

    def on_case(record):
        if record is not None and record["case_id"] in {c.case_id for c in zsre_cases[3:20:4]}:
            sizes.append(live_tensor_bytes())  # after the last case of each chunk was stored

    store = ResultStore(tmp_path, CONFIG)
    summary = run_continual(ftm(tiny_llama), Evaluator(tiny_llama), zsre_cases[:20], store, 4, "end", on_case)
    assert len(sizes) == 5 and max(sizes) == min(sizes)
    assert_same_state(tiny_llama, before)
    assert summary["n_cases"] == 20 and summary["n_chunks"] == 5
    assert [r["chunk"] for r in store.records] == [i // 4 for i in range(20)]


def test_summary_averages_over_the_cases_of_a_chunk_then_over_chunks():
    def record(chunk, rel, por):
        return {"chunk": chunk, "pre": {"rel": 0.0}, "post": {"rel": rel, "gen": None, "por": por, "loc": 1.0},
                "steps": 1, "edit_s": 1.0, "eval_s": 1.0}

    records = [record(0, 1.0, None), record(0, 0.0, None), record(1, 1.0, 0.5)]
    s = summarize(records)
    assert (s["rel"], s["por"], s["gen"], s["loc"]) == (75.0, 50.0, None, 100.0)  # per case, rel would be 66.67
    assert s["avg"] == pytest.approx((75 + 50 + 100) / 3, abs=0.01) and s["n_chunks"] == 2


def test_resume_skips_finished_chunks_and_refuses_a_chunk_cut_elsewhere(tmp_path, tiny_llama, zsre_cases):
    evaluator = Evaluator(tiny_llama)
    run_continual(ftm(tiny_llama), evaluator, zsre_cases[:6], ResultStore(tmp_path, CONFIG), 3)
    editor = ftm(tiny_llama)
    summary = run_continual(editor, evaluator, zsre_cases[:9], ResultStore(tmp_path, CONFIG), 3)
    assert editor.edited == [c.case_id for c in zsre_cases[6:9]] and summary["n_chunks"] == 3
    short = tmp_path / "short"
    run_continual(ftm(tiny_llama), evaluator, zsre_cases[:4], ResultStore(short, CONFIG), 3)  # chunks 0-2, 3
    with pytest.raises(RunError, match=r"chunk 1 \(zsre/3 \.\. zsre/5\) is partly in .* \(1 of 3 cases\)"):
        run_continual(ftm(tiny_llama), evaluator, zsre_cases[:6], ResultStore(short, CONFIG), 3)


def test_a_failing_edit_loses_no_finished_chunk_and_leaves_the_model_unedited(tmp_path, tiny_llama, zsre_cases):
    before = state(tiny_llama)
    editor = ftm(tiny_llama)
    editor.fail_on = "zsre/4"
    with pytest.raises(RunError, match=r"case zsre/4 failed: synthetic failure\. The 3 finished cases are saved"):
        run_continual(editor, Evaluator(tiny_llama), zsre_cases[:6], ResultStore(tmp_path, CONFIG), 3)
    assert_same_state(tiny_llama, before)  # zsre/3 was edited, then reverted with the chunk
    _, records, _ = read_run(tmp_path)
    assert [r["case_id"] for r in records] == ["zsre/0", "zsre/1", "zsre/2"]


def test_a_bundle_of_edits_is_applied_in_order(tiny_llama):
    facts = tuple(EditCase(f"b/edit{j}", p, t) for j, (p, t) in
                  enumerate([("The capital of Italy is", "Paris"), ("Rome is the capital of", "Spain")]))
    bundle = EditCase("b", "The capital of Italy is", "Paris", edits=facts)
    editor = ftm(tiny_llama)
    (record,) = edit_chunk(editor, Evaluator(tiny_llama), [bundle])
    assert editor.edited == ["b/edit0", "b/edit1"]
    assert record["steps"] == 6 and len(record["losses"]) == 2 and record["detail"]["rel"]["rewrite"] >= 0


class CountingEvaluator(Evaluator):
    """The teacher-forced evaluator, recording how many cases each unedited-model call covered."""

    def __init__(self, lm):
        super().__init__(lm)
        self.calls: list[int] = []

    def before_many(self, cases, record_from):
        self.calls.append(len(cases))
        return super().before_many(cases, record_from)


def test_single_editing_evaluates_the_unedited_model_for_several_cases_at_once(tmp_path, tiny_llama, zsre_cases,
                                                                               monkeypatch):
    from overtone.runner import continual

    config = {"editor": {"name": "ft-m"}, "protocol": "single"}
    together = CountingEvaluator(tiny_llama)
    with ResultStore(tmp_path / "a", config) as store:
        run_continual(ftm(tiny_llama), together, zsre_cases[:6], store)  # cases 0-5
    with ResultStore(tmp_path / "a", config) as store:  # resumed with 20 cases: the 6 stored are not evaluated again
        run_continual(ftm(tiny_llama), together, zsre_cases[:20], store)
    assert continual.PREFETCH == 16 and together.calls == [6, 14]
    monkeypatch.setattr(continual, "PREFETCH", 1)
    one_by_one = CountingEvaluator(tiny_llama)
    with ResultStore(tmp_path / "b", config) as alone:
        run_continual(ftm(tiny_llama), one_by_one, zsre_cases[:20], alone)
    assert one_by_one.calls == [1] * 20
    strip = ("eval_s", "edit_s")
    assert [{k: v for k, v in r.items() if k not in strip} for r in store.records] == \
        [{k: v for k, v in r.items() if k not in strip} for r in alone.records]


class RecordingStatic(OverTone):
    """OverTone "w/o dyn" that keeps the first reference it was given for each target (by its label ids)."""

    def __init__(self) -> None:
        super().__init__(OverToneConfig(dynamic=False))
        self.references: dict[tuple[int, ...], torch.Tensor] = {}

    def token_losses(self, logits, labels, reference):
        self.references.setdefault(tuple(labels.tolist()), reference.clone())
        return super().token_losses(logits, labels, reference)


@pytest.mark.parametrize("name, settings", [("ft-m", {"layer": 1, "lr": 0.5, "steps": 3}),
                                            ("rome", {"layer": 1, "steps": 3, "mom2_adjustment": False})])
def test_a_static_target_in_a_sequence_reads_the_unedited_model(tiny_llama, zsre_cases, name, settings):
    """'w/o dyn' takes its prior from the unedited model: also for the second edit of a chunk, whose own first
    pass sees the first edit."""
    from overtone.editors import make_editor
    from overtone.tokens import encode_pairs

    cases = zsre_cases[:2]
    objective = RecordingStatic()
    editor = make_editor(name, tiny_llama, objective, **settings)
    before = state(tiny_llama)
    unedited = []
    for case in cases:  # the unedited model's logits at each target, from a plain forward
        batch = encode_pairs(tiny_llama.tokenizer, [case.prompt], [case.target])
        with torch.no_grad():
            logits = tiny_llama.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[0]
        unedited.append((tuple(batch.labels[0][batch.label_mask[0]].tolist()),
                         logits[batch.positions[0, : int(batch.label_mask.sum())]].float()))
    edit_chunk(editor, Evaluator(tiny_llama), cases)
    assert_same_state(tiny_llama, before)
    assert editor.references == {}  # dropped with the chunk
    for labels, logits in unedited:
        # ROME scores every prompt variant of a case together; the bare prompt's tokens come first
        (key,) = [k for k in objective.references if k[: len(labels)] == labels]
        seen = objective.references[key][: len(labels)]
        torch.testing.assert_close(seen, logits, atol=1e-4, rtol=1e-4)
