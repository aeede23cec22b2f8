"""What WISE and MELO promise alike: they fit the edit, route each sequence on its own tokens, leave
unrouted sequences exactly as the base model computes them, keep suffix replay valid, and revert
bit-exactly, alone or in a sequence of edits."""

from __future__ import annotations

import pytest
import torch
from helpers import NaNObjective, assert_same_state, state, tiny_model

from overtone.benchmarks import EditCase
from overtone.editors import EditError, EditStack, make_editor
from overtone.evaluation import Evaluator
from overtone.models import forward_hidden, forward_suffix
from overtone.objectives import CrossEntropy, OverTone, OverToneConfig
from overtone.tokens import encode_pairs

SETTINGS = {
    "wise": dict(layer=2, lr=5.0, steps=30, mask_ratio=1.0, alpha=0.5, beta=2.0, gamma=1.0, act_ratio=0.88),
    "melo": dict(layers=(2, 3), init_radius=1e-3, lr=0.1, steps=30, alpha=4.0),
}
EDITORS = sorted(SETTINGS)
CASE = EditCase(case_id="t/0", prompt="Which family does Epaspidoceras belong to?", target="Noctuidae")
UNRELATED = ("The capital of Japan is the large and busy city of", "Tokyo")


def editor(name, lm, objective=None, **overrides):
    return make_editor(name, lm, objective or CrossEntropy(), **{**SETTINGS[name], **overrides})


def target_loss(lm, case: EditCase) -> float:
    batch = encode_pairs(lm.tokenizer, [case.prompt], [case.target])
    with torch.no_grad():
        hidden, _ = forward_hidden(lm.adapter, batch.input_ids, batch.attention_mask)
        return CrossEntropy()(lm.adapter.logits(batch.gather(hidden)), batch.labels).loss.item()


def logits_of(lm, pairs):
    batch = encode_pairs(lm.tokenizer, [p for p, _ in pairs], [a for _, a in pairs])
    with torch.no_grad():
        hidden, _ = forward_hidden(lm.adapter, batch.input_ids, batch.attention_mask)
    return lm.adapter.logits(batch.gather(hidden))[batch.label_mask.nonzero(as_tuple=True)].split(
        batch.label_mask.sum(-1).tolist())


def structure(lm):
    """Every module object and every hook of the model: what an editor must leave as it found it."""
    modules = dict(lm.model.named_modules())
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules.values())
    return {k: id(v) for k, v in modules.items()}, hooks


def routed(ed) -> list[bool]:
    return [r is not None for r in ed.last_routes] if ed.name == "melo" else (ed.last_routes >= 0).tolist()


@pytest.mark.parametrize("name", EDITORS)
def test_edit_fits_and_revert_is_bit_exact(any_tiny, name):
    check_fit_and_revert(any_tiny, name, CrossEntropy())


@pytest.mark.parametrize("name", EDITORS)
def test_overtone_objective_drives_the_edit(tiny_llama, name):
    check_fit_and_revert(tiny_llama, name, OverTone(OverToneConfig(epsilon=0.0)))


def check_fit_and_revert(any_tiny, name, objective):
    before, shape = state(any_tiny), structure(any_tiny)
    base = logits_of(any_tiny, [(CASE.prompt, CASE.target), UNRELATED])
    loss_before = target_loss(any_tiny, CASE)
    ed = editor(name, any_tiny, objective)
    handle = ed.edit([CASE])
    assert handle.stats.steps > 0 and handle.first_layer == ed.first_layer
    assert target_loss(any_tiny, CASE) < 0.7 * loss_before
    assert not any(p.requires_grad for p in any_tiny.model.parameters())
    handle.revert()
    assert_same_state(any_tiny, before)
    assert structure(any_tiny) == shape and not hasattr(any_tiny.model, "peft_config")
    after = logits_of(any_tiny, [(CASE.prompt, CASE.target), UNRELATED])
    assert all(torch.equal(a, b) for a, b in zip(after, base, strict=True))
    handle.revert()  # idempotent
    assert structure(any_tiny) == shape


@pytest.mark.parametrize("name", EDITORS)
def test_each_row_routes_on_its_own_tokens_and_unrouted_rows_are_untouched(tiny_llama, name):
    pairs = [(CASE.prompt, CASE.target), UNRELATED]
    base = logits_of(tiny_llama, pairs)
    ed = editor(name, tiny_llama)
    ed.edit([CASE])
    together = logits_of(tiny_llama, pairs)
    assert routed(ed) == [True, False]
    alone = [logits_of(tiny_llama, [pair])[0] for pair in pairs]
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(together[1], base[1])  # no memory outside the edit's scope: the base model, bit for bit
    assert not torch.equal(together[0], base[0])
    reversed_order = logits_of(tiny_llama, pairs[::-1])
    assert routed(ed) == [False, True]
    torch.testing.assert_close(reversed_order[1], together[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", EDITORS)
def test_suffix_replay_from_first_layer_equals_a_full_pass(any_tiny, name, zsre_cases):
    case = zsre_cases[0]
    evaluator = Evaluator(any_tiny)
    ed = editor(name, any_tiny)
    probes = evaluator.probes(case)
    pre = evaluator.predict(probes, record_from=ed.first_layer)
    ed.edit([case])
    batch = probes.batch
    with torch.no_grad():
        full, _ = forward_hidden(any_tiny.adapter, batch.input_ids, batch.attention_mask)
        full_routes = list(routed(ed))
        replayed = forward_suffix(any_tiny.adapter, pre.cache)
    assert routed(ed) == full_routes and full_routes[0]  # the rewrite probe uses the edit
    assert torch.equal(full, replayed)


@pytest.mark.parametrize("name", EDITORS)
def test_a_sequence_of_edits_keeps_each_and_reverts_in_any_order(tiny_llama, name, zsre_cases):
    before, shape = state(tiny_llama), structure(tiny_llama)
    # WISE: one shard per edit, so this is retrieval across saved shards
    ed = editor(name, tiny_llama, **({"save_freq": 1} if name == "wise" else {}))
    cases = zsre_cases[:3]
    losses = [target_loss(tiny_llama, c) for c in cases]
    handles = [ed.edit([c]) for c in cases]
    for case, loss in zip(cases, losses, strict=True):
        assert target_loss(tiny_llama, case) < loss
        assert routed(ed) == [True]
    handles[1].revert()  # undoes the second and third edits; the third handle becomes a no-op
    assert target_loss(tiny_llama, cases[0]) < losses[0]
    assert target_loss(tiny_llama, cases[2]) == pytest.approx(losses[2], abs=1e-6)
    handles[2].revert()
    assert target_loss(tiny_llama, cases[0]) < losses[0]
    handles[0].revert()
    assert_same_state(tiny_llama, before)
    assert structure(tiny_llama) == shape


@pytest.mark.parametrize("name", EDITORS)
def test_an_edit_stack_keeps_only_the_first_handle_and_reverts_bit_exactly(tiny_llama, name, zsre_cases):
    before, shape = state(tiny_llama), structure(tiny_llama)
    ed = editor(name, tiny_llama, steps=5)
    stack = EditStack()
    last = zsre_cases[2]
    loss = target_loss(tiny_llama, last)
    handles = [stack.push(ed.edit([c])) for c in zsre_cases[:3]]
    assert stack.handles == handles[:1] and not any(h.active for h in handles[1:])
    assert target_loss(tiny_llama, last) < loss and routed(ed) == [True]  # the later edits are in place
    stack.revert()
    assert_same_state(tiny_llama, before)
    assert structure(tiny_llama) == shape and not hasattr(tiny_llama.model, "peft_config")



@pytest.mark.parametrize("name", EDITORS)
def test_a_failed_edit_is_a_clear_error_and_keeps_the_earlier_edits(tiny_llama, name):
    before, shape = state(tiny_llama), structure(tiny_llama)
    with pytest.raises(EditError, match=r"case t/0: the .*nan"):
        editor(name, tiny_llama, NaNObjective()).edit([CASE])
    assert structure(tiny_llama) == shape and not hasattr(tiny_llama.model, "peft_config")
    ed = editor(name, tiny_llama)
    first = ed.edit([CASE])
    fitted = target_loss(tiny_llama, CASE)
    ed.objective = NaNObjective()
    with pytest.raises(EditError):
        ed.edit([EditCase("t/1", "The capital of Italy is", "Mary")])
    assert target_loss(tiny_llama, CASE) == fitted
    first.revert()
    assert_same_state(tiny_llama, before)
    assert structure(tiny_llama) == shape
    assert not any(p.requires_grad for p in tiny_llama.model.parameters())


@pytest.mark.parametrize("name", EDITORS)
def test_bf16_model_edits_and_reverts(tokenizer, name):
    lm = tiny_model("llama", tokenizer, dtype=torch.bfloat16)
    before = state(lm)
    loss_before = target_loss(lm, CASE)
    handle = editor(name, lm).edit([CASE])
    assert target_loss(lm, CASE) < 0.7 * loss_before
    handle.revert()
    assert_same_state(lm, before)


@pytest.mark.parametrize("name", EDITORS)
def test_several_cases_in_one_call(tiny_llama, name, zsre_cases):
    cases = zsre_cases[:2]
    losses = [target_loss(tiny_llama, c) for c in cases]
    editor(name, tiny_llama).edit(cases)
    assert all(target_loss(tiny_llama, c) < loss for c, loss in zip(cases, losses, strict=True))


@pytest.mark.parametrize("name", EDITORS)
def test_on_step_sees_every_forward(tiny_llama, name):
    seen = []
    handle = editor(name, tiny_llama, steps=4).edit([CASE], on_step=lambda info: seen.append((info.step, info.loss)))
    assert [s for s, _ in seen] == list(range(len(handle.stats.losses)))
    assert [loss for _, loss in seen] == handle.stats.losses
