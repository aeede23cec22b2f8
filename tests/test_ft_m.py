"""FT-M: what it trains, how it stops, and that revert is bit-exact."""

from __future__ import annotations

import pytest
import torch
from helpers import NaNObjective, assert_same_state, state, tiny_model

from overtone.benchmarks import EditCase
from overtone.editors import FTM, EditError, FTMConfig, make_editor
from overtone.editors.ft_m import default_layer
from overtone.models import forward_hidden
from overtone.objectives import CrossEntropy, OverTone, OverToneConfig
from overtone.tokens import encode_pairs

CASE = EditCase(case_id="t/0", prompt="Which family does Epaspidoceras belong to?", target="Noctuidae")


def target_loss(lm, case: EditCase) -> float:
    batch = encode_pairs(lm.tokenizer, [case.prompt], [case.target])
    with torch.no_grad():
        hidden, _ = forward_hidden(lm.adapter, batch.input_ids, batch.attention_mask)
        return CrossEntropy()(lm.adapter.logits(batch.gather(hidden)), batch.labels).loss.item()


@pytest.mark.parametrize("objective", [CrossEntropy(), OverTone(OverToneConfig(epsilon=0.0))])
def test_edit_fits_the_target_and_revert_is_bit_exact(any_tiny, objective):
    before = state(any_tiny)
    loss_before = target_loss(any_tiny, CASE)
    editor = FTM(any_tiny, FTMConfig(layer=2, lr=0.3, steps=40), objective)
    handle = editor.edit([CASE])
    assert handle.stats.steps > 0 and handle.first_layer == 2
    assert target_loss(any_tiny, CASE) < 0.5 * loss_before
    after = any_tiny.model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert changed == [any_tiny.adapter.path("mlp_out", 2) + ".weight"]
    assert not any(p.requires_grad for p in any_tiny.model.parameters())
    handle.revert()
    assert_same_state(any_tiny, before)
    handle.revert()  # idempotent
    assert_same_state(any_tiny, before)


def test_loss_history_matches_a_full_forward(tiny_llama):
    """The replayed steps see exactly what a full forward pass would see."""
    editor = FTM(tiny_llama, FTMConfig(layer=1, lr=1e-2, steps=4), CrossEntropy())
    handle = editor.edit([CASE])
    handle.revert()
    # redo the same training by hand with full forwards
    weight = tiny_llama.adapter.weight("mlp_out", 1)
    weight.requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=1e-2)
    batch = encode_pairs(tiny_llama.tokenizer, [CASE.prompt], [CASE.target])
    losses = []
    for _ in range(4):
        hidden, _ = forward_hidden(tiny_llama.adapter, batch.input_ids, batch.attention_mask)
        loss = CrossEntropy()(tiny_llama.adapter.logits(batch.gather(hidden)), batch.labels).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    hidden, _ = forward_hidden(tiny_llama.adapter, batch.input_ids, batch.attention_mask)  # after the last step
    losses.append(CrossEntropy()(tiny_llama.adapter.logits(batch.gather(hidden)), batch.labels).loss.item())
    weight.requires_grad_(False)
    assert handle.stats.losses == pytest.approx(losses, rel=1e-5)


def test_step_skipped_and_stopped_below_threshold(tiny_llama):
    before = state(tiny_llama)
    handle = FTM(tiny_llama, FTMConfig(layer=1, stop_loss=1e6), CrossEntropy()).edit([CASE])
    assert handle.stats.steps == 0 and handle.stats.stopped_early and len(handle.stats.losses) == 1
    assert_same_state(tiny_llama, before)


def test_overtone_runs_the_host_loop_unless_told_to_stop_when_clipped(tiny_llama):
    clipped = OverTone(OverToneConfig(epsilon=1e6))  # every token clipped from the start
    host = FTM(tiny_llama, FTMConfig(layer=1, steps=4), clipped).edit([CASE])
    assert host.stats.steps == 4 and not host.stats.stopped_early  # epsilon floors the loss above 0.01
    host.revert()
    handle = FTM(tiny_llama, FTMConfig(layer=1, steps=25, stop_when_clipped=True), clipped).edit([CASE])
    assert handle.stats.steps == 0 and handle.stats.stopped_early and handle.stats.stop_reason == "clipped"


def test_static_target_gets_the_unedited_logits(tiny_llama):
    handle = FTM(tiny_llama, FTMConfig(layer=1, lr=1e-2, steps=5),
                 OverTone(OverToneConfig(dynamic=False, epsilon=0.0))).edit([CASE])
    assert handle.stats.steps == 5
    handle.revert()



def test_nan_loss_is_a_clear_error_and_restores_weights(tiny_llama):
    before = state(tiny_llama)
    editor = FTM(tiny_llama, FTMConfig(layer=1), NaNObjective())
    with pytest.raises(EditError, match="case t/0: the nan loss is nan at step 0; the weights were restored"):
        editor.edit([CASE])
    assert_same_state(tiny_llama, before)
    assert not any(p.requires_grad for p in tiny_llama.model.parameters())


def test_norm_constraint_bounds_the_change(tiny_llama):
    w0 = tiny_llama.adapter.weight("mlp_out", 1).detach().clone()
    FTM(tiny_llama, FTMConfig(layer=1, lr=0.1, steps=5, norm_constraint=1e-3), CrossEntropy()).edit([CASE])
    delta = tiny_llama.adapter.weight("mlp_out", 1) - w0
    assert delta.abs().max() <= 1e-3 + 1e-7 and delta.abs().max() > 0


def test_bf16_model_trains_through_an_fp32_master_and_reverts(tokenizer):
    lm = tiny_model("llama", tokenizer, dtype=torch.bfloat16)
    before = state(lm)
    handle = FTM(lm, FTMConfig(layer=2, lr=5e-2, steps=10), OverTone()).edit([CASE])
    assert lm.adapter.weight("mlp_out", 2).dtype == torch.bfloat16
    assert handle.stats.losses[-1] < handle.stats.losses[0]
    handle.revert()
    assert_same_state(lm, before)


def test_batch_of_edits(tiny_llama):
    other = EditCase(case_id="t/1", prompt="The capital of Italy is", target="Mary Smith")
    handle = FTM(tiny_llama, FTMConfig(layer=2, lr=5e-2, steps=20), CrossEntropy()).edit([CASE, other])
    assert handle.stats.losses[-1] < handle.stats.losses[0]


def test_default_layer_keeps_the_reference_relative_depth():
    assert default_layer(32) == 21  # Llama-2-7B / Llama-3-8B in the reference toolkit
    assert default_layer(30) == 20  # the embedded SmolLM2-135M
    assert default_layer(4) == 3


def test_make_editor_validates_settings(tiny_llama):
    editor = make_editor("ft-m", tiny_llama, CrossEntropy(), layer=1, lr=None)
    assert editor.config.layer == 1 and editor.config.lr == 5e-4
    assert make_editor("ft-m", tiny_llama, CrossEntropy()).config.layer == 3
    with pytest.raises(ValueError, match="unknown editor 'rome2'"):
        make_editor("rome2", tiny_llama, CrossEntropy())
    with pytest.raises(ValueError, match="has no setting"):
        make_editor("ft-m", tiny_llama, CrossEntropy(), rank=4)
    with pytest.raises(ValueError, match="out of range"):
        make_editor("ft-m", tiny_llama, CrossEntropy(), layer=9)
    with pytest.raises(ValueError, match="needs an objective"):
        make_editor("ft-m", tiny_llama, None)


def test_on_step_sees_every_forward_with_token_statistics(tiny_llama):
    seen = []
    handle = FTM(tiny_llama, FTMConfig(layer=1, lr=1e-2, steps=4), OverTone()).edit(
        [CASE], on_step=lambda info: seen.append((info.step, info.loss, info.output.mask.sum().item())))
    assert [s for s, _, _ in seen] == list(range(len(handle.stats.losses)))
    assert [loss for _, loss, _ in seen] == handle.stats.losses
    assert all(n > 0 for _, _, n in seen)
