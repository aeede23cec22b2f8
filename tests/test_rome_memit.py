"""ROME and MEMIT: what they change, the closed-form properties of their updates, and exact reverts."""

from __future__ import annotations

import pytest
import torch
from helpers import ARCHS, assert_same_state, state, tiny_model

from overtone.benchmarks import EditCase, load_benchmark
from overtone.editors import MEMIT, ROME, EditError, MEMITConfig, ROMEConfig, make_editor
from overtone.editors.locate import SubjectError, encode_rows, lookup_activations, optimise_value
from overtone.editors.locate.value import optimise_values
from overtone.editors.memit import default_layers
from overtone.editors.rome import default_layer
from overtone.objectives import CrossEntropy, OverTone
from overtone.stats import second_moments

CASE = EditCase(case_id="t/0", prompt="Which family does Epaspidoceras belong to?", target="Noctuidae",
                subject="Epaspidoceras")
OTHER = EditCase(case_id="t/1", prompt="Who is listed as Wang Jipeng father?", target="Wang Chonghua",
                 subject="Wang Jipeng")
THIRD = EditCase(case_id="t/2", prompt="What voice type is Louise Grandjean?", target="mezzo soprano",
                 subject="Louise Grandjean")
FAST = {"context_lengths": ((4, 2),), "steps": 6, "lr": 2.0, "stop_loss": 0.0}


def changed(lm, before):
    after = lm.model.state_dict()
    return sorted(k for k, v in before.items() if not torch.equal(v, after[k]))


@pytest.mark.parametrize(("arch", "mom2"), [(arch, True) for arch in ARCHS] + [("llama", False)])
def test_rome_writes_the_value_at_the_key_with_a_rank_one_update(tokenizer, corpus, arch, mom2):
    lm = tiny_model(arch, tokenizer)
    before = state(lm)
    config = ROMEConfig(layer=1, mom2_adjustment=mom2, mom2_corpus=corpus, **FAST)
    editor = ROME(lm, config, CrossEntropy())
    module = lm.adapter.module("mlp_out", 1)
    # what ROME will aim for, computed the same way beforehand (everything is deterministic)
    value = optimise_value(lm, CASE, module, 1, editor.prefixes, CrossEntropy(), config)
    rows = encode_rows(lm.tokenizer, CASE, editor.prefixes, with_answer=False)
    (keys,) = lookup_activations(lm, rows, [(module, "in")], 1)
    w0 = module.weight.detach().clone()

    handle = editor.edit([CASE])
    assert changed(lm, before) == [lm.adapter.path("mlp_out", 1) + ".weight"]
    delta = lm.adapter.oriented(module.weight.detach() - w0)  # [out, in]
    assert torch.linalg.matrix_rank(delta.double(), rtol=1e-6).item() == 1
    (after,) = lookup_activations(lm, rows[:1], [(module, "out")], 1)
    torch.testing.assert_close(after[0], value.target, rtol=1e-4, atol=1e-4)  # W' k = v*
    # keys orthogonal to u (in the C^-1 metric when mom2 is on) are not changed
    u = keys.mean(0).double()
    if mom2:
        u = torch.linalg.solve(second_moments(lm, [1], config.moment_spec())[1].matrix.double(), u)
    probe = torch.randn(u.shape[0], dtype=torch.float64)
    probe -= (probe @ u) / (u @ u) * u
    assert (delta.double() @ probe).abs().max() < 1e-4 * (delta.double() @ keys[0].double()).abs().max()
    assert handle.stats.steps == value.stats.steps and handle.stats.losses == value.stats.losses
    assert not any(p.requires_grad for p in lm.model.parameters())
    handle.revert()
    assert_same_state(lm, before)


def test_rome_sequences_stack_and_revert_in_order(tiny_llama):
    before = state(tiny_llama)
    editor = ROME(tiny_llama, ROMEConfig(layer=2, mom2_adjustment=False, **FAST), CrossEntropy())
    first = editor.edit([CASE])
    after_first = state(tiny_llama)
    second = editor.edit([OTHER])
    assert changed(tiny_llama, after_first) == ["model.layers.2.mlp.down_proj.weight"]
    second.revert()
    assert_same_state(tiny_llama, after_first)
    first.revert()
    assert_same_state(tiny_llama, before)
    both = editor.edit([CASE, OTHER])  # one call, one rank-one update per case
    w = tiny_llama.adapter.weight("mlp_out", 2).detach() - before["model.layers.2.mlp.down_proj.weight"]
    assert torch.linalg.matrix_rank(w.double(), rtol=1e-6).item() == 2
    both.revert()
    assert_same_state(tiny_llama, before)


def test_rome_on_bf16_reverts_exactly(tokenizer):
    lm = tiny_model("llama", tokenizer, dtype=torch.bfloat16)
    before = state(lm)
    handle = ROME(lm, ROMEConfig(layer=1, mom2_adjustment=False, **FAST), OverTone()).edit([CASE])
    assert changed(lm, before) and lm.adapter.weight("mlp_out", 1).dtype == torch.bfloat16
    handle.revert()
    assert_same_state(lm, before)


def test_failed_edits_restore_the_weights_and_name_the_case(tiny_llama, corpus):
    before = state(tiny_llama)
    editor = ROME(tiny_llama, ROMEConfig(layer=1, mom2_adjustment=False, **FAST), CrossEntropy())
    missing = EditCase("zsre/9", "Who wrote Dune?", "Herbert", subject="Asimov")
    with pytest.raises(SubjectError, match="case zsre/9: subject 'Asimov' does not occur"):
        editor.edit([CASE, missing])  # the first case was already written: it must be undone
    assert_same_state(tiny_llama, before)
    lenient = ROME(tiny_llama, ROMEConfig(layer=1, mom2_adjustment=False, missing_subject="prompt_last", **FAST),
                   CrossEntropy())
    lenient.edit([missing]).revert()
    assert_same_state(tiny_llama, before)

    class Exploding(CrossEntropy):
        def token_losses(self, logits, labels, reference):
            loss, *rest = super().token_losses(logits, labels, reference)
            return loss * float("inf"), *rest

    with pytest.raises(EditError, match="case t/0"):
        MEMIT(tiny_llama, MEMITConfig(layers=(1, 2), mom2_corpus=corpus, **FAST), Exploding()).edit([CASE])
    assert_same_state(tiny_llama, before)


def test_memit_batch_spreads_one_update_over_its_layers(any_tiny, corpus):
    lm = any_tiny
    before = state(lm)
    # without context prefixes the key of a case is its bare prompt's key, so the algebra is exact
    settings = {**FAST, "context_lengths": ()}
    config = MEMITConfig(layers=(1, 2, 3), mom2_update_weight=1e-3, mom2_corpus=corpus, **settings)
    editor = MEMIT(lm, config, CrossEntropy())
    cases = [CASE, OTHER, THIRD]
    top = lm.adapter.layers[3]
    # the values as the edit optimises them, in one batch (value_batch >= 3): at the top block of this 4-block
    # model the targets barely pull on them, so their Adam steps follow the rounding of their gradients
    targets = torch.stack([v.target for v in optimise_values(lm, cases, top, 3, editor.prefixes, CrossEntropy(),
                                                             config)])
    bare = [encode_rows(lm.tokenizer, c, [""], with_answer=False)[0] for c in cases]
    (start,) = lookup_activations(lm, bare, [(top, "out")], 3)

    handle = editor.edit(cases)
    assert changed(lm, before) == sorted(lm.adapter.path("mlp_out", layer) + ".weight" for layer in (1, 2, 3))
    (reached,) = lookup_activations(lm, bare, [(top, "out")], 3)
    # With a small lambda the last layer closes the residual: the residual stream reaches z. Gemma 2/3
    # normalise the MLP output before adding it to the residual stream, so there it only gets closer.
    share = 1.0 if lm.adapter.model_type == "gemma3_text" else 0.05
    for i in range(3):
        assert (targets[i] - reached[i]).norm() < share * (targets[i] - start[i]).norm()
    assert len(handle.stats.losses) >= 3 and handle.first_layer == 1
    handle.revert()
    assert_same_state(lm, before)


@pytest.mark.parametrize("name", ["memit", "alphaedit"])
def test_batched_values_give_the_sequential_update(tiny_llama, corpus, monkeypatch, name):
    """``value_batch`` facts' values optimised together: the update and the reported stats are the sequential
    ones (``value_batch`` 1) up to float summation order."""
    import overtone.editors.memit as memit

    groups: list[int] = []
    batched = memit.optimise_values
    monkeypatch.setattr(memit, "optimise_values", lambda lm, cases, *a, **k: groups.append(len(cases)) or
                        batched(lm, cases, *a, **k))
    weights = [tiny_llama.adapter.weight("mlp_out", layer) for layer in (1, 2)]
    before = [w.detach().clone() for w in weights]
    cases = [CASE, OTHER, THIRD]
    # the first case stops after 4 updates (its loss below 7.05) and leaves its batch, the others run 12
    settings = {**FAST, "steps": 12, "stop_loss": 7.05}
    where = {"layers": (1, 2)} if name == "memit" else {"layers": (1, 2), "nullspace_threshold": 1e3}
    runs = {}
    for value_batch in (1, 2, 3):
        editor = make_editor(name, tiny_llama, CrossEntropy(), mom2_corpus=corpus, value_batch=value_batch,
                             **where, **settings)
        passes: dict[str, int] = {}
        handle = editor.edit(cases, on_step=lambda info, seen=passes: seen.update({info.cases[0].case_id: info.step}))
        runs[value_batch] = ([w.detach() - b for w, b in zip(weights, before, strict=True)], handle.stats)
        handle.revert()
    assert groups == [1, 1, 1, 2, 1, 3]
    (sequential, first), *others = runs.values()
    assert len(set(passes.values())) > 1  # the cases left their batches at different steps
    # the changes, read as differences of float32 weights, are far above the tolerance of their rounding
    assert all(d.abs().max() > 1e3 * 1e-6 for d in sequential)
    for deltas, stats in others:
        for got, want in zip(deltas, sequential, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        assert stats.steps == first.steps and stats.stop_reason == first.stop_reason
        torch.testing.assert_close(torch.tensor(stats.losses), torch.tensor(first.losses), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.tensor(stats.extra_losses), torch.tensor(first.extra_losses), rtol=1e-4,
                                   atol=1e-6)
    with pytest.raises(ValueError, match="value_batch must be >= 1"):
        MEMITConfig(value_batch=0)


def test_memit_lambda_trades_reach_for_preservation(tiny_llama, corpus):
    reach = {}
    for weight in (1e-3, 1e4):
        before = state(tiny_llama)
        editor = MEMIT(tiny_llama, MEMITConfig(layers=(1, 2), mom2_update_weight=weight, mom2_corpus=corpus, **FAST),
                       CrossEntropy())
        handle = editor.edit([CASE])
        w = tiny_llama.adapter.weight("mlp_out", 2).detach() - before["model.layers.2.mlp.down_proj.weight"]
        reach[weight] = w.norm().item()
        handle.revert()
        assert_same_state(tiny_llama, before)
    assert reach[1e4] < reach[1e-3]


def test_memit_sequence_of_batches_reverts_in_order(tiny_llama, corpus):
    before = state(tiny_llama)
    editor = MEMIT(tiny_llama, MEMITConfig(layers=(2, 3), mom2_corpus=corpus, **FAST), CrossEntropy())
    first = editor.edit([CASE, OTHER])
    middle = state(tiny_llama)
    second = editor.edit([THIRD])
    assert changed(tiny_llama, middle) == ["model.layers.2.mlp.down_proj.weight", "model.layers.3.mlp.down_proj.weight"]
    second.revert()
    assert_same_state(tiny_llama, middle)
    first.revert()
    assert_same_state(tiny_llama, before)


def test_defaults_and_settings(tiny_llama, corpus):
    assert default_layer(tiny_llama) == 1 and default_layers(tiny_llama) == (0, 1)  # relative depths 5/32, 4..8/32
    editor = make_editor("memit", tiny_llama, CrossEntropy(), layers=[3, 2], mom2_corpus=corpus, layer=None)
    assert editor.config.layers == (2, 3) and editor.first_layer == 2 and editor.config.mom2_update_weight == 15000
    described = editor.describe()
    assert described["context_prefixes"][0] == "" and len(described["context_prefixes"]) == 6
    assert set(described["mom2"]) == {2, 3}
    with pytest.raises(ValueError, match="editor 'memit' has no setting"):
        make_editor("memit", tiny_llama, CrossEntropy(), layer=2)
    with pytest.raises(ValueError, match="out of range"):
        make_editor("rome", tiny_llama, CrossEntropy(), layer=4, mom2_adjustment=False)
    with pytest.raises(ValueError, match="needs an objective"):
        make_editor("rome", tiny_llama, None, mom2_adjustment=False)
    with pytest.raises(ValueError, match="kl_prompt must contain"):
        ROMEConfig(kl_prompt="is a")
    rome = make_editor("rome", tiny_llama, CrossEntropy(), mom2_adjustment=False)
    assert rome.describe()["mom2"] is None and len(rome.prefixes) == 6  # MEMIT's 5 prefixes + the bare prompt


def test_counterfact_cases_edit_end_to_end(tiny_llama):
    from overtone import Evaluator, edit_and_score

    case = load_benchmark("counterfact", limit=1)[0]
    editor = ROME(tiny_llama, ROMEConfig(layer=1, mom2_adjustment=False, **FAST), CrossEntropy())
    record = edit_and_score(editor, Evaluator(tiny_llama), case)
    assert set(record["detail"]["loc"]) == {"neighborhood", "Distracting_Neighborhood"}
    assert 0 <= record["post"]["rel"] <= 1 and record["steps"] >= 1


@pytest.mark.parametrize("name", ["rome", "memit"])
def test_sequences_through_the_runner_keep_one_copy_and_revert_bit_exact(tiny_llama, corpus, zsre_cases, name):
    from overtone import Evaluator
    from overtone.editors import EditStack
    from overtone.runner import edit_chunk

    where = {"layer": 1} if name == "rome" else {"layers": (1, 2)}
    editor = make_editor(name, tiny_llama, CrossEntropy(), mom2_corpus=corpus, **where, **FAST)
    before = state(tiny_llama)
    stack = EditStack()
    for case in zsre_cases[:3]:
        stack.push(editor.edit([case]))
    assert len(stack.handles) == 1  # later edits of the same matrices need no copy of their own
    stack.revert()
    assert_same_state(tiny_llama, before)
    records = edit_chunk(editor, Evaluator(tiny_llama), zsre_cases[:3])
    assert [r["case_id"] for r in records] == [c.case_id for c in zsre_cases[:3]]
    assert all(r["steps"] >= 1 and 0 <= r["post"]["rel"] <= 1 for r in records)
    assert_same_state(tiny_llama, before)


def test_memit_batches_through_the_runner_share_one_update_per_batch(tiny_llama, corpus, zsre_cases):
    from overtone import Evaluator
    from overtone.runner import edit_chunk

    editor = make_editor("memit", tiny_llama, CrossEntropy(), mom2_corpus=corpus, layers=(1, 2), **FAST)
    before = state(tiny_llama)
    calls = []
    edit = editor.edit
    editor.edit = lambda cases, on_step=None: calls.append(len(cases)) or edit(cases, on_step)
    records = edit_chunk(editor, Evaluator(tiny_llama), zsre_cases[:5], batch=2)
    assert calls == [2, 2, 1]  # two batches of two and the rest, in sequence
    assert records[0]["edit_s"] == records[1]["edit_s"] and records[0]["losses"] == records[1]["losses"]
    assert [r["steps"] for r in records] == [6] * 5  # a batch's 2 x 6 value updates, shared by its two cases
    assert_same_state(tiny_llama, before)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_closed_form_writes_by_rows_give_the_bits_of_the_whole_matrix(tiny_llama, monkeypatch, dtype):
    """The writes of ROME, MEMIT and UltraEdit and the re-application of a saved change add a block of rows at a time
    (a 7B MLP matrix widened whole is 1 GiB in fp64); the sum is elementwise, so the bits are the whole matrix's."""
    from overtone.editors import parallel
    from overtone.editors.locate import update

    monkeypatch.setattr(parallel, "WRITE_CHUNK_VALUES", 7 * 64 + 3)  # blocks of 7 rows, the last one short
    torch.manual_seed(0)
    start = torch.randn(45, 64).to(dtype)
    change = torch.randn(45, 64) * 1e-3
    weight = torch.nn.Parameter(start.clone())
    update.add_update(tiny_llama.adapter, weight, change)
    assert torch.equal(weight.detach(), (start.double() + change.double()).to(dtype))
    assert not torch.equal(weight.detach(), start)

    widened = change.to(update.wide(start).dtype)
    weight = torch.nn.Parameter(start.clone())
    update.add_change(weight, widened)
    assert torch.equal(weight.detach(), (update.wide(start) + widened).to(dtype))
