"""The guard of the model the slow suite shares (tests/helpers.py ``WeightGuard``) sees what a test leaves behind."""

from __future__ import annotations

import torch
from helpers import WeightGuard, counting_ftm

from overtone.benchmarks import EditCase

CASE = EditCase("c", "The capital of Italy is", "Mary")
DOWN = "model.layers.2.mlp.down_proj.weight"


def test_an_edit_reverted_passes_and_one_left_in_place_is_named(tiny_llama):
    guard = WeightGuard(tiny_llama.model)
    assert guard.changes() == []
    handle = counting_ftm(tiny_llama).edit([CASE])
    assert guard.changes() == [f"{DOWN}: values differ"]
    handle.revert()
    assert guard.changes() == []
    assert guard.changes() == []  # the reverted tensor is not hashed again: its version is the one last seen


def test_a_replaced_tensor_is_compared_by_value(tiny_llama):
    guard = WeightGuard(tiny_llama.model)
    mlp = tiny_llama.model.model.layers[2].mlp
    original = mlp.down_proj.weight
    mlp.down_proj.weight = torch.nn.Parameter(original.detach().clone(), requires_grad=False)
    assert guard.changes() == []
    mlp.down_proj.weight = torch.nn.Parameter(original.detach() + 1e-6, requires_grad=False)
    assert guard.changes() == [f"{DOWN}: values differ"]


def test_added_tensors_hooks_modes_and_trainable_parameters_are_named(tiny_llama):
    model = tiny_llama.model
    guard = WeightGuard(model)
    model.model.layers[2].mlp.register_buffer("memory", torch.zeros(2))
    hook = model.model.layers[1].register_forward_hook(lambda *args: None)
    model.model.layers[0].train()
    model.lm_head.weight.requires_grad_(True)
    assert guard.changes() == ["forward hooks differs", "model.layers.2.mlp.memory: added",
                               "trainable parameters differs", "training mode differs"]
    del model.model.layers[2].mlp.memory
    hook.remove()
    model.eval()
    model.lm_head.weight.requires_grad_(False)
    assert guard.changes() == []
