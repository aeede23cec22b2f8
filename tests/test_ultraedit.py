"""UltraEdit: its update is the ridge solution on the recorded features, its running statistics are those of
the whole stream, and a batch is one forward and backward pass (the round trips: test_alphaedit.py)."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import ARCHS, tiny_model
from test_alphaedit import FOURTH
from test_rome_memit import CASE, OTHER, THIRD

from overtone.editors import UltraEdit, UltraEditConfig, make_editor, ultraedit
from overtone.editors.ultraedit import EPS, default_modules
from overtone.objectives import CrossEntropy, OverTone

log = logging.getLogger(__name__)
MODULES = ("mlp_gate.1", "mlp_in.1", "mlp_in.2")  # gate and up share a shape, so one normaliser


def editor_on(lm, objective=None, modules=MODULES, lr=1e-2) -> UltraEdit:
    return UltraEdit(lm, UltraEditConfig(modules=modules, lr=lr), objective or CrossEntropy())


def expected_updates(keys, grads, rows, lr: float) -> list[torch.Tensor]:
    """The updates computed from the definitions, apart from the editor's code: features standardised with the
    mean and unbiased std of ``rows`` (every feature row of the shape seen so far), pseudo-values
    -lr |k^|^2 g^, and the ridge regression of them on the raw keys as a least-squares problem with
    identity rows appended."""
    mean, std = rows.mean(dim=0), rows.std(dim=0)
    out = []
    for k, g in zip(keys, grads, strict=True):
        z = (torch.cat([k, g], dim=1) - mean) / (std + EPS)
        k_hat, g_hat = z[:, : k.shape[1]], z[:, k.shape[1]:]
        values = -lr * (k_hat**2).sum(dim=1, keepdim=True) * g_hat
        stacked = torch.cat([k, torch.eye(k.shape[1], dtype=torch.float64)])
        wanted = torch.cat([values, torch.zeros(k.shape[1], values.shape[1], dtype=torch.float64)])
        out.append(torch.linalg.lstsq(stacked, wanted).solution.T)  # [out, in]
    return out


@pytest.mark.parametrize("objective", [CrossEntropy, OverTone])
def test_each_update_is_the_ridge_solution_and_the_statistics_cover_the_stream(tokenizer, objective):
    lm = tiny_model("llama", tokenizer)
    editor = editor_on(lm, objective())
    seen: list[torch.Tensor] = []
    for batch in ([CASE, OTHER], [THIRD, FOURTH]):
        keys, grads, _ = editor.features(batch)  # what edit() records, on the model as it is now
        seen += [torch.cat([k, g], dim=1) for k, g in zip(keys, grads, strict=True)]
        before = [m.weight.detach().double().clone() for m in editor.modules]
        editor.edit(batch)
        rows = torch.cat(seen)
        state = editor.stream.state
        shape = editor.shapes[0]
        assert state[f"count.{shape}"].item() == rows.shape[0]
        torch.testing.assert_close(state[f"mean.{shape}"], rows.mean(dim=0), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state[f"m2.{shape}"], rows.var(dim=0) * (rows.shape[0] - 1), rtol=1e-9,
                                   atol=1e-12)
        for module, old, wanted in zip(editor.modules, before, expected_updates(keys, grads, rows, 1e-2),
                                       strict=True):
            change = module.weight.detach().double() - old
            gap = ((change - wanted).abs().max() / wanted.abs().max()).item()
            rounding = (torch.finfo(torch.float32).eps * module.weight.detach().abs().max() / wanted.abs().max()).item()
            log.info("ridge: %d feature rows, max |update| %.2e, max relative gap to the direct solve %.2e (fp32 "
                     "rounding of the weights: %.2e)", rows.shape[0], wanted.abs().max(), gap, rounding)
            assert gap < 2 * rounding + 1e-9


@pytest.mark.parametrize("objective", [CrossEntropy, OverTone])
def test_the_pass_in_length_groups_records_each_cases_own_features(tokenizer, monkeypatch, objective):
    """Rows of similar length run together, each group cut to its longest row: in one padded pass, in groups
    or row by row, the features are each case's alone, in case order (the batch's loss is the mean of the
    cases' losses, so a case's output gradients are its own divided by the batch size)."""
    lm = tiny_model("llama", tokenizer)
    editor = editor_on(lm, objective())
    cases = [CASE, OTHER, THIRD, FOURTH]
    lengths = [len(tokenizer(f"{c.prompt} {c.target}")["input_ids"]) for c in cases]
    assert lengths != sorted(lengths, reverse=True)  # the groups, longest first, are not in case order
    alone = [editor.features([case]) for case in cases]
    keys = [torch.cat([a[0][m] for a in alone]) for m in range(len(MODULES))]
    grads = [torch.cat([a[1][m] for a in alone]) / len(cases) for m in range(len(MODULES))]
    loss = sum(a[2].loss.item() for a in alone) / len(cases)
    passes = []
    lm.model.base_model.register_forward_hook(lambda _m, args, _out: passes.append(args))
    for budget, count in ((10**9, 1), (2 * max(lengths), 2), (1, len(cases))):
        monkeypatch.setattr(ultraedit, "PASS_TOKENS", budget)
        passes.clear()
        got_keys, got_grads, got_loss = editor.features(cases)
        assert len(passes) == count
        assert got_loss.loss.item() == pytest.approx(loss, rel=1e-6)
        for got, want in zip(got_keys + got_grads, keys + grads, strict=True):
            assert want.abs().max() > 0
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("arch", ARCHS)
def test_one_pass_edits_every_architecture_and_moves_the_targets(tokenizer, arch):
    lm = tiny_model(arch, tokenizer)
    modules = ("mlp_in.1", "mlp_in.2") if arch == "gpt2" else MODULES
    editor = editor_on(lm, modules=modules, lr=0.5)
    before = editor.features([CASE, OTHER])[2].loss.item()
    handle = editor.edit([CASE, OTHER])
    after = editor.features([CASE, OTHER])[2].loss.item()
    assert handle.stats.steps == 1 and handle.stats.losses == [pytest.approx(before)]
    assert after < before
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_settings_are_checked_and_default_to_the_reference_depths(tokenizer):
    with pytest.raises(ValueError, match=r"ROLE\.LAYER"):
        UltraEditConfig(modules=("down.3",))
    with pytest.raises(ValueError, match="lr"):
        UltraEditConfig(lr=0.0)
    assert default_modules(32) == tuple([f"mlp_gate.{i}" for i in range(11, 16)] +
                                        [f"mlp_in.{i}" for i in range(18, 25)])
    editor = make_editor("ultraedit", tiny_model("llama", tokenizer), CrossEntropy())
    assert editor.config.lr == 1e-6 and editor.config.modules == default_modules(4)
    with pytest.raises(ValueError, match="exactly 3"):
        editor.edit([CASE], steps=3)
