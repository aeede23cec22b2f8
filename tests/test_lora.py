"""LoRA on peft: adapters where the config says, eval-mode evaluation, bit-exact removal."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_state, state
from peft.tuners.lora import LoraLayer
from test_ft_m import CASE, target_loss

from overtone.benchmarks import EditCase
from overtone.editors import LoRA, LoRAConfig, make_editor
from overtone.objectives import CrossEntropy, OverTone, OverToneConfig

FAST = dict(lr=0.03, steps=40, dropout=0.0)


def lora_layers(lm) -> list[str]:
    return [n for n, m in lm.model.named_modules() if isinstance(m, LoraLayer)]


@pytest.mark.parametrize("variant", ["lora", "adalora"])
def test_edit_fits_and_revert_removes_the_adapters_bit_exact(any_tiny, variant):
    before = state(any_tiny)
    modules_before = [type(m) for m in any_tiny.model.modules()]
    loss_before = target_loss(any_tiny, CASE)
    handle = LoRA(any_tiny, LoRAConfig(variant=variant, **FAST), CrossEntropy()).edit([CASE])
    # attention-only adapters move a tiny random model slowly; a clear drop in nats is enough here
    assert target_loss(any_tiny, CASE) < loss_before - 1.0
    adapted = lora_layers(any_tiny)
    assert len(adapted) == (4 if any_tiny.adapter.model_type == "gpt2" else 8)  # q and v (GPT-2: c_attn) x 4
    assert not any(p.requires_grad for p in any_tiny.model.parameters())
    handle.revert()
    assert lora_layers(any_tiny) == []
    assert [type(m) for m in any_tiny.model.modules()] == modules_before
    assert_same_state(any_tiny, before)


def test_layers_and_roles_are_configurable(tiny_llama):
    editor = LoRA(tiny_llama, LoRAConfig(layers=(2, 3), target_roles=("mlp_out",), **FAST), CrossEntropy())
    assert editor.first_layer == 2
    handle = editor.edit([CASE])
    assert sorted(lora_layers(tiny_llama)) == ["model.layers.2.mlp.down_proj", "model.layers.3.mlp.down_proj"]
    assert handle.first_layer == 2
    handle.revert()


def test_dropout_trains_only_while_editing(tiny_llama):
    modes = []

    def record(info):
        modes.append([m.training for n, m in tiny_llama.model.named_modules() if "lora_dropout" in n])

    handle = LoRA(tiny_llama, LoRAConfig(steps=2), CrossEntropy()).edit([CASE], on_step=record)
    assert modes and all(all(step) for step in modes)
    assert not any(m.training for m in tiny_llama.model.modules())
    handle.revert()


def test_same_case_gives_the_same_edit(tiny_llama):
    editor = LoRA(tiny_llama, LoRAConfig(**FAST), CrossEntropy())
    first = editor.edit([CASE])
    losses = first.stats.losses
    first.revert()
    second = editor.edit([CASE])
    assert second.stats.losses == losses
    second.revert()


def test_sequential_edits_share_the_adapter_and_revert_in_reverse(tiny_llama):
    before = state(tiny_llama)
    other = EditCase("t/1", "The capital of Italy is", "Mary Smith")
    editor = LoRA(tiny_llama, LoRAConfig(**FAST), CrossEntropy())
    first = editor.edit([CASE])
    after_first = {n: p.detach().clone() for n, p in tiny_llama.model.named_parameters() if "lora_" in n}
    second = editor.edit([other])
    assert len(lora_layers(tiny_llama)) == 8  # no second set of adapters
    second.revert()
    for n, p in tiny_llama.model.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, after_first[n])
    first.revert()
    assert_same_state(tiny_llama, before)
    assert lora_layers(tiny_llama) == []


def test_overtone_runs_every_step_unless_told_to_stop_when_clipped(tiny_llama):
    clipped = OverTone(OverToneConfig(epsilon=1e6))  # every token clipped from the start
    host = LoRA(tiny_llama, LoRAConfig(**{**FAST, "steps": 3}), clipped).edit([CASE])
    assert host.stats.steps == 3 and not host.stats.stopped_early  # the reference's loop: its whole budget
    host.revert()
    handle = LoRA(tiny_llama, LoRAConfig(**FAST, stop_when_clipped=True), clipped).edit([CASE])
    assert handle.stats.steps == 0 and handle.stats.stopped_early and handle.stats.stop_reason == "clipped"
    handle.revert()


class RecordingCE(CrossEntropy):
    """Cross-entropy that notes every call's loss and whether it was a training pass (with gradient) or the
    loop's stop decision (run without gradient)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __call__(self, logits, labels, reference=None):
        out = super().__call__(logits, labels, reference)
        self.calls.append((out.loss.item(), torch.is_grad_enabled()))
        return out


def test_a_stop_decision_is_judged_without_dropout(tiny_llama):
    """With dropout, the loss of a training pass is noisy; the stop rule reads an extra pass without it."""
    objective = RecordingCE()
    threshold = 3.0
    handle = LoRA(tiny_llama, LoRAConfig(variant="lora", lr=0.03, steps=40, dropout=0.05, stop_loss=threshold),
                  objective).edit([CASE])
    training = [loss for loss, grad in objective.calls if grad]
    decisions = [loss for loss, grad in objective.calls if not grad]
    assert len(training) == len(decisions) == handle.stats.steps + 1  # one decision per training pass
    assert handle.stats.stopped_early and decisions[-1] < threshold <= min(decisions[:-1])
    assert handle.stats.losses == pytest.approx(training)  # the record keeps the training passes' losses
    clean = target_loss(tiny_llama, CASE)  # the final adapters in eval mode: what the last decision read
    assert decisions[-1] == pytest.approx(clean, rel=1e-5) and training[-1] != pytest.approx(clean, rel=1e-3)
    handle.revert()
    objective.calls.clear()
    LoRA(tiny_llama, LoRAConfig(variant="lora", lr=0.03, steps=3, dropout=0.5), objective).edit([CASE]).revert()
    assert all(grad for _, grad in objective.calls)  # no stop rule, no extra pass


def test_adalora_refuses_a_rank_it_would_ignore():
    with pytest.raises(ValueError, match="rank=4 has no effect on AdaLoRA without rank allocation"):
        LoRAConfig(rank=4)
    assert LoRAConfig(rank=4, variant="lora").rank_value == 4
    assert LoRAConfig(rank=4, rank_allocation=True).rank_value == 4
    assert LoRAConfig().rank_value == 8


def test_errors_leave_no_adapters(tiny_llama):
    from test_ft_m import NaNObjective

    before = state(tiny_llama)
    with pytest.raises(Exception, match="loss is nan"):
        LoRA(tiny_llama, LoRAConfig(**FAST), NaNObjective()).edit([CASE])
    assert lora_layers(tiny_llama) == []
    assert_same_state(tiny_llama, before)


def test_configuration_errors(tiny_llama):
    with pytest.raises(ValueError, match="variant must be"):
        LoRAConfig(variant="dora")
    with pytest.raises(ValueError, match="role 'attn_qkv' does not exist in llama"):
        LoRA(tiny_llama, LoRAConfig(target_roles=("attn_qkv",)), CrossEntropy())
    with pytest.raises(ValueError, match="out of range"):
        make_editor("lora", tiny_llama, CrossEntropy(), layers=(9,))
