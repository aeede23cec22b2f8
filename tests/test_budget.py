"""The budget of a study on a named GPU (study/budget.py, ``overtone study plan --gpu``): the cost model on a
case small enough to count by hand, its tables against the editors' own, and the options' errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from overtone.benchmarks.cases import EditCase, Probe
from overtone.editors import FTMConfig, editor_config
from overtone.editors import parallel as parallel_editing
from overtone.editors.presets import model_shapes
from overtone.study import budget
from overtone.study.budget import (
    BudgetError,
    CaseTokens,
    Device,
    MachineRates,
    Shape,
    case_tokens,
    edit_cost,
    eval_cost,
    parse_rates,
    window_size,
)
from tests.helpers import cli, said

STUDY = Path(__file__).parent.parent / "studies" / "paper-table-4-2.yaml"
# 2 blocks of hidden 4 (2 heads of 2), MLP 8, vocabulary 10: a block holds 2*16 + 2*4*4 = 64 attention weights
# and 3*4*8 = 96 MLP weights, 160 in all.
TINY = Shape(layers=2, hidden=4, intermediate=8, heads=2, kv_heads=2, vocab=10)


def test_forward_flops_count_every_weight_twice_per_token_plus_attention_and_the_head():
    assert TINY.block_params == 160
    # 3 tokens through 2 blocks: 2 * 160 * 3 weights, attention 2 * 4 * 3 * 4; the head 2 * 4 * 10 at 1 position
    assert TINY.forward_flops(3, 2, 1) == 2 * (960 + 96) + 80
    assert TINY.weight_bytes == (2 * 160 + 2 * 10 * 4) * 2


def test_an_ft_m_step_is_forward_backward_through_its_blocks_and_the_weight_gradient():
    tokens = CaseTokens(edit=3, target=1, probes=((2, 1),))
    cost = edit_cost("ft-m", TINY, FTMConfig(layer=1, steps=5), tokens)
    forward = (2 * 160 * 3 + 96) + 80  # block 1 only, the target's logits
    assert cost.step_flops == 2 * forward + 2 * 3 * 32  # backward = forward again; dW of mlp_out (4 x 8)
    assert cost.weight_bytes == (160 + 40) * 2  # block 1 and the head, bf16
    assert cost.steps == 5
    assert cost.record_flops == 2 * 160 * 3 + 96  # the first pass through block 0
    assert cost.solve_flops == 0


def test_a_step_takes_the_longer_of_compute_and_reading_the_weights_over_the_efficiency():
    rates = MachineRates(flops=1000.0, bandwidth=100.0, edit_efficiency=0.5, eval_efficiency=0.25)
    assert rates.step_seconds(2464, 400) == pytest.approx(8.0)  # reading: 4 s, compute 2.46 s
    assert rates.step_seconds(8000, 400) == pytest.approx(16.0)  # compute-bound
    # a window of 4 cases shares one reading per step: 4 x 2464 FLOPs take 9.9 s, 2.46 s per case
    cost = budget.EditCost(step_flops=2464, weight_bytes=400, steps=2, record_flops=0, solve_flops=0)
    assert rates.edit_seconds(cost, 4) == pytest.approx(2 * 4 * 2464 / 1000 / 0.5 / 4)


def test_evaluation_counts_the_probes_before_and_after_and_the_generated_replies():
    tokens = CaseTokens(edit=3, target=1, probes=((2, 1),))
    forced = eval_cost(TINY, tokens, "teacher-forced", first_layer=1)
    assert forced.flops == TINY.forward_flops(3, 2, 3) + TINY.forward_flops(3, 1, 3)
    assert forced.reads == 2
    wild = eval_cost(TINY, tokens, "wild", first_layer=1, reply=5)
    assert wild.flops == 2 * TINY.forward_flops(2, 2, 1) + 2 * 5 * TINY.forward_flops(1, 2, 1)
    assert wild.reads == 10
    both = eval_cost(TINY, tokens, "both", first_layer=1, reply=5)
    assert (both.flops, both.reads) == (forced.flops + wild.flops, 12)


def test_tokens_of_a_case_are_counted_for_each_probe():
    case = EditCase("c", "Who wrote Hamlet?", "Shakespeare", rephrases=("Hamlet was written by whom?",),
                    locality={"loc": (Probe("Capital of France?", "Paris"),)})
    tokens = case_tokens(lambda text: len(text.split()), case)
    assert tokens.probes == ((3, 1), (5, 1), (3, 1))
    assert (tokens.edit, tokens.target) == (4, 1)


def test_auto_window_is_the_runners_rule_on_the_devices_memory():
    assert (budget.AUTO_SHARE, budget.AUTO_MAX) == (parallel_editing.AUTO_MEMORY_SHARE, parallel_editing.AUTO_MAX)
    shape = budget.MODELS["llama-2-7b"].sizes()
    config = editor_config("ft-m")
    memory = budget.case_memory("ft-m", shape, config)
    assert memory.shared == 4 * 32000 * 4096  # the float32 copy of Llama-2-7B's head, once per window
    gpu = Device("test", "", memory_gb=40, bf16_tflops=1, fp64_tflops=1, bandwidth_gbs=1)
    assert window_size("auto", "ft-m", shape, config, gpu, "llama-2-7b") == int(
        (0.5 * (40e9 - shape.weight_bytes) - memory.shared) // memory.total)
    assert window_size(3, "ft-m", shape, config, gpu, "llama-2-7b") == 3
    assert window_size("auto", "wise", shape, editor_config("wise"), gpu, "llama-2-7b") == 1
    lora = budget.case_memory("lora", shape, editor_config("lora"), evaluation="both")  # as the runner counts it
    assert lora.evaluation > lora.activations and lora.total == lora.state + lora.evaluation
    assert budget.case_memory("lora", shape, editor_config("lora")).evaluation == 0  # teacher-forced
    assert window_size("auto", "lora", shape, editor_config("lora"), gpu, "llama-2-7b", "both") < window_size(
        "auto", "lora", shape, editor_config("lora"), gpu, "llama-2-7b")


def test_model_profiles_agree_with_the_presets_shapes():
    presets = model_shapes()
    for name, profile in budget.MODELS.items():
        assert {k: profile.shape[k] for k in presets[name]} == dict(presets[name])


def test_rates_are_seconds_per_case():
    assert parse_rates("edit=1.5,eval=0.25") == {"edit": 1.5, "eval": 0.25}
    assert parse_rates("eval=2") == {"eval": 2.0}
    for bad in ("edit", "edit=x", "speed=1", "edit=-1", "edit=nan"):
        with pytest.raises(BudgetError, match="--rate"):
            parse_rates(bad)


def test_plan_prints_the_budget_split_into_editing_and_evaluation():
    result = cli("study", "plan", STUDY, "--profile", "llama-2-7b", "--limit", "2", "--gpu", "a100-80gb")
    text = said(result)
    assert "budget on one a100-80gb, llama-2-7b" in text
    assert "editing +" in text and "evaluation" in text and "assumes: device a100-80gb" in text
    given = said(cli("study", "plan", STUDY, "--profile", "llama-2-7b", "--limit", "2", "--gpu", "h100",
                     "--rate", "edit=36,eval=36"))
    # 4 datasets x 2 cases x 8 cells of an editor and objective, 36 s each: 32 x 2 x 72 s = 1.28 GPU-hours
    assert "total: 1.3 GPU-hours on one h100 = 0.6 editing + 0.6 evaluation" in given


@pytest.mark.parametrize(("args", "named"), [
    (["--profile", "llama-2-7b", "--gpu", "tpu-v9"], "--gpu 'tpu-v9' is not a known device"),
    (["--profile", "llama-2-7b", "--gpu", "h100", "--rate", "edit=fast"], "--rate edit='fast'"),
    (["--profile", "llama-2-7b", "--rate", "edit=1"], "--rate: give the device"),
    (["--gpu", "h100"], "--gpu: give the model shape"),
])
def test_plan_errors_name_the_option(args, named):
    result = cli("study", "plan", STUDY, "--limit", "1", *args, code=None)
    assert result.exit_code != 0 and named in said(result)
    assert "cells" not in said(result)  # refused before the study is expanded


def test_a_profile_without_a_model_shape_is_named(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(STUDY.read_text().replace("  llama-3-8b:\n    description", "  mistral:\n    description"))
    result = cli("study", "plan", study, "--limit", "1", "--profile", "mistral", "--gpu", "h100", code=None)
    assert result.exit_code != 0 and "--profile 'mistral' has no model shape for a budget" in said(result)
