"""AlphaEdit: the null-space property of its update, its accumulated state against the joint solve, and, for both
lifelong editors (AlphaEdit, UltraEdit), exact revert, save/apply and a stream continued after apply."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import tiny_model
from test_rome_memit import CASE, FAST, OTHER, THIRD

from overtone.artifacts import load_edit, save_edit
from overtone.benchmarks import EditCase
from overtone.editors import AlphaEdit, AlphaEditConfig, EditStack, make_editor
from overtone.editors.alphaedit import alphaedit_factors
from overtone.editors.locate import encode_rows, lookup_activations
from overtone.editors.memit import case_keys
from overtone.objectives import CrossEntropy, OverTone
from overtone.stats import MomentSpec, second_moments

log = logging.getLogger(__name__)
FOURTH = EditCase(case_id="t/3", prompt="Which country is Lake Vostok in?", target="Antarctica", subject="Lake Vostok")
LAYERS = (1, 2)


def threshold(lm, corpus, quantile: float) -> float:
    """An eigenvalue threshold that leaves ``quantile`` of the key directions of layers 1-2 to the update."""
    moments = second_moments(lm, LAYERS, MomentSpec(corpus=corpus))
    values = torch.cat([torch.linalg.eigvalsh(m.matrix.double()) for m in moments.values()])
    return float(values.quantile(quantile))


def alphaedit(lm, corpus, objective=None, quantile: float = 0.5) -> AlphaEdit:
    config = AlphaEditConfig(layers=LAYERS, mom2_corpus=corpus, nullspace_threshold=threshold(lm, corpus, quantile),
                             **FAST)
    return AlphaEdit(lm, config, objective or CrossEntropy())


def keys_of(editor: AlphaEdit, cases, layer: int) -> torch.Tensor:
    """The cases' keys at ``layer`` as AlphaEdit reads them, from the model as it is now."""
    rows = [r for c in cases for r in encode_rows(editor.lm.tokenizer, c, editor.prefixes, False)]
    (keys,) = lookup_activations(editor.lm, rows, [(editor.lm.adapter.module("mlp_out", layer), "in")], layer)
    return case_keys(keys, len(cases), editor.groups).double()


def test_the_solve_is_the_papers_formula_and_leaves_preserved_keys_unchanged():
    """A second moment with a known spectrum: P k = 0 for the large-eigenvalue directions, and there Delta k = 0."""
    torch.manual_seed(0)
    width, hidden, n = 48, 24, 6
    basis, _ = torch.linalg.qr(torch.randn(width, width, dtype=torch.float64))
    spectrum = torch.cat([torch.full((20,), 5.0), torch.logspace(-4, -3, width - 20, dtype=torch.float64)])
    values, vectors = torch.linalg.eigh(basis @ torch.diag(spectrum) @ basis.T)
    null = vectors[:, values < 2e-2]
    projection = null @ null.T
    assert null.shape[1] == width - 20
    keys, residual = torch.randn(n, width, dtype=torch.float64), torch.randn(n, hidden, dtype=torch.float64)
    earlier = torch.randn(10, width, dtype=torch.float64)
    cache = earlier.T @ earlier
    left, right = alphaedit_factors(projection, cache, keys, residual, l2=1.0)
    delta = left @ right
    paper = residual.T @ keys @ projection @ torch.linalg.inv(
        (keys.T @ keys + cache) @ projection + torch.eye(width, dtype=torch.float64))
    assert torch.allclose(delta, paper, rtol=1e-9, atol=1e-12)
    preserved = vectors[:, values >= 2e-2] @ torch.randn(20, 100, dtype=torch.float64)  # 100 keys with P k = 0
    ratio = ((delta @ preserved).abs().max() / delta.abs().max()).item()
    log.info("null-space property, synthetic C: max |Delta k| / max |Delta| = %.2e over 100 preserved keys", ratio)
    assert ratio < 1e-12
    assert (delta @ null).abs().max() > 1e-3  # the update does act on the null space


def test_an_edit_leaves_the_outputs_of_preserved_keys_unchanged(tokenizer, corpus):
    lm = tiny_model("llama", tokenizer)
    editor = alphaedit(lm, corpus)
    before = {layer: lm.adapter.weight("mlp_out", layer).detach().double().clone() for layer in LAYERS}
    moments = second_moments(lm, LAYERS, editor.config.moment_spec())  # of the unedited model, as the editor's
    editor.edit([CASE, OTHER])
    for layer in LAYERS:
        moment = moments[layer].matrix.double()
        values, vectors = torch.linalg.eigh(moment)
        large = vectors[:, values >= editor.config.nullspace_threshold]
        preserved = large @ torch.randn(large.shape[1], 100, dtype=torch.float64)
        weight = lm.adapter.weight("mlp_out", layer).detach().double()
        change = weight - before[layer]
        # the weights are float32: W + Delta is rounded to W', so (W' - W) k is Delta k plus that rounding
        rounding = (torch.finfo(torch.float32).eps * weight.abs() @ preserved.abs()).max()
        moved = (change @ preserved).abs().max()
        log.info("layer %d: null space %d of %d; max |(W'-W) k| on preserved keys %.2e (fp32 rounding bound %.2e),"
                 " max |W'-W| %.2e", layer, moment.shape[0] - large.shape[1], moment.shape[0], moved, rounding,
                 change.abs().max())
        assert moved <= rounding
        assert change.abs().max() > 1e3 * rounding / moment.shape[0]


def test_cache_c_sums_the_batches_keys_and_the_next_solve_is_the_joint_one(tokenizer, corpus):
    """With P = I, the second batch's update with cache_c = K1^T K1 is the ridge solve over both batches' keys
    that keeps the first batch's outputs (residual 0) and writes the second's."""
    lm = tiny_model("llama", tokenizer)
    editor = alphaedit(lm, corpus)
    editor.edit([CASE, OTHER])
    first = {layer: keys_of(editor, [CASE, OTHER], layer) for layer in LAYERS}
    for layer in LAYERS:
        torch.testing.assert_close(editor.stream.state[f"cache_c.{layer}"], first[layer].T @ first[layer],
                                   rtol=1e-12, atol=1e-12)
    editor.edit([THIRD, FOURTH])
    for layer in LAYERS:
        second = keys_of(editor, [THIRD, FOURTH], layer)
        total = first[layer].T @ first[layer] + second.T @ second
        torch.testing.assert_close(editor.stream.state[f"cache_c.{layer}"], total, rtol=1e-12, atol=1e-12)

    width, hidden = first[1].shape[1], 32
    keys, residual = torch.randn(2, width, dtype=torch.float64), torch.randn(2, hidden, dtype=torch.float64)
    left, right = alphaedit_factors(torch.eye(width, dtype=torch.float64), first[1].T @ first[1], keys, residual,
                                    l2=1.0)
    stacked = torch.cat([first[1], keys, torch.eye(width, dtype=torch.float64)])  # ridge as extra rows
    wanted = torch.cat([torch.zeros(2, hidden, dtype=torch.float64), residual,
                        torch.zeros(width, hidden, dtype=torch.float64)])
    joint = torch.linalg.lstsq(stacked, wanted).solution.T  # [hidden, width]
    gap = ((left @ right - joint).abs().max() / joint.abs().max()).item()
    log.info("cache_c against the joint solve: max relative difference %.2e", gap)
    assert gap < 1e-9


def test_a_fresh_editor_on_an_unedited_model_starts_from_zero_and_reset_zeroes(tokenizer, corpus):
    lm = tiny_model("llama", tokenizer)
    editor = alphaedit(lm, corpus)
    stack = EditStack()
    stack.push(editor.edit([CASE]))
    assert alphaedit(lm, corpus).stream.state["cache_c.1"].abs().sum() > 0  # the live edit's stream continues
    stack.revert()
    assert all(t.abs().sum() == 0 for t in alphaedit(lm, corpus).stream.state.values())
    editor.edit([CASE])
    editor.reset()
    assert all(t.abs().sum() == 0 for t in editor.stream.state.values())


# --------------------------------------------------------------------------------- both lifelong editors

def ultraedit(lm, corpus, objective=None):
    return make_editor("ultraedit", lm, objective or CrossEntropy(), modules=("mlp_gate.1", "mlp_in.2"), lr=1e-2)


MAKERS = {"alphaedit": lambda lm, corpus, objective=None: alphaedit(lm, corpus, objective, quantile=0.75),
          "ultraedit": ultraedit}


def snapshot(lm, editor) -> list[torch.Tensor]:
    weights = [p.detach().clone() for p in lm.model.parameters()]
    return weights + [t.clone() for t in editor.stream.state.values()]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("objective", [CrossEntropy, OverTone])
@pytest.mark.parametrize("kind", MAKERS)
def test_revert_restores_weights_and_state_bit_for_bit(tokenizer, corpus, kind, objective):
    lm = tiny_model("llama", tokenizer)
    editor = MAKERS[kind](lm, corpus, objective())
    start = snapshot(lm, editor)
    stack = EditStack()
    stack.push(editor.edit([CASE, OTHER]))
    middle = snapshot(lm, editor)
    assert not same(middle, start)
    handle = editor.edit([THIRD, FOURTH])
    assert not same(snapshot(lm, editor), middle)
    handle.revert()
    assert same(snapshot(lm, editor), middle)
    stack.push(editor.edit([THIRD, FOURTH]))  # released by the stack: the first handle restores the same tensors
    assert len(stack.handles) == 1
    stack.revert()
    assert same(snapshot(lm, editor), start)


@pytest.mark.parametrize("kind", MAKERS)
def test_save_apply_and_a_stream_continued_after_apply_are_bit_exact(tokenizer, corpus, tmp_path, kind):
    """A stream of two batches equals: the first batch, saved; a fresh model with the artifact applied; the second
    batch. The editor is built on the base model before the artifact is applied, as its statistics and context
    prefixes are read from the model it is built on."""
    whole = tiny_model("llama", tokenizer)
    editor = MAKERS[kind](whole, corpus, OverTone())
    editor.edit([CASE, OTHER])
    after_first = snapshot(whole, editor)
    save_edit(editor, tmp_path / "first", facts=[CASE, OTHER])
    editor.edit([THIRD, FOURTH])
    uninterrupted = snapshot(whole, editor)

    resumed = tiny_model("llama", tokenizer)
    continued = MAKERS[kind](resumed, corpus, OverTone())
    base = snapshot(resumed, continued)
    handle = load_edit(tmp_path / "first").apply(resumed)
    assert same(snapshot(resumed, continued), after_first)
    continued.edit([THIRD, FOURTH])
    assert same(snapshot(resumed, continued), uninterrupted)
    save_edit(continued, tmp_path / "both", facts=[CASE, OTHER, THIRD, FOURTH])  # the whole stream, from its base
    handle.revert()
    assert same(snapshot(resumed, continued), base)
    load_edit(tmp_path / "both").apply(resumed)
    assert same(snapshot(resumed, continued), uninterrupted)


def test_the_learning_rate_comes_from_the_models_preset_else_the_reference(tokenizer):
    """The embedded model's preset sets lr 0.5 (chosen on ZsRE development records, docs/lifelong.md); a model
    without a preset gets the reference's 0.1 from the fallback; an explicit lr always wins."""
    from overtone.editors.presets import editor_presets, resolve_preset

    lm = tiny_model("llama", tokenizer)
    presets = editor_presets("alphaedit", AlphaEditConfig)
    assert resolve_preset(AlphaEditConfig(), presets, lm, "AlphaEdit").lr == 0.1
    assert resolve_preset(AlphaEditConfig(preset="smollm2-135m"), presets, lm, "AlphaEdit").lr == 0.5
    assert resolve_preset(AlphaEditConfig(preset="llama-3-8b"), presets, lm, "AlphaEdit").lr == 0.1
    assert resolve_preset(AlphaEditConfig(preset="smollm2-135m", lr=0.2), presets, lm, "AlphaEdit").lr == 0.2
