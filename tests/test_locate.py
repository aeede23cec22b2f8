"""Primitives of ROME and MEMIT: subject lookup, aligned rows, tail replay, context prefixes, value optimisation."""

from __future__ import annotations

import pytest
import torch
from helpers import NaNObjective

from overtone.benchmarks import EditCase
from overtone.editors.base import EditError
from overtone.editors.locate import (
    LocateConfig,
    SubjectError,
    context_prefixes,
    encode_rows,
    encode_subject_row,
    lookup_activations,
    optimise_value,
    subject_span,
    token_at,
)
from overtone.editors.locate.subject import align_rows, drop_last_token
from overtone.models import forward_hidden
from overtone.models.tail import TailPass
from overtone.objectives import CrossEntropy, OverTone, OverToneConfig

CASE = EditCase(case_id="t/0", prompt="Which family does Epaspidoceras belong to?", target="Noctuidae",
                subject="Epaspidoceras")
PREFIXES = ("", "The dog ran home. ", "Because of the rain we stayed in. ")


def test_subject_span_exact_then_ignoring_case_and_spacing():
    assert subject_span("Where is Paris? Paris is", "Paris") == (16, 21)  # the last occurrence
    assert subject_span("Who founded apple inc?", " Apple Inc ") == (12, 21)
    assert subject_span("Who is  Jane\tDoe?", "jane doe") == (8, 16)
    assert subject_span("Who is Jane?", "John") is None
    assert subject_span("Who is Jane?", "  ") is None


def test_token_at_covers_the_character_or_falls_back():
    offsets = [(0, 0), (0, 5), (5, 11), (12, 15)]  # a special token, then a gap at 11 (whitespace left out)
    assert token_at(offsets, 3) == 1 and token_at(offsets, 10) == 2
    assert token_at(offsets, 11) == 2 and token_at(offsets, 14) == 3


def test_lookup_is_the_subjects_last_token_in_every_prefixed_row(tokenizer):
    rows = encode_rows(tokenizer, CASE, PREFIXES, with_answer=True)
    for prefix, row in zip(PREFIXES, rows, strict=True):
        text = prefix + CASE.prompt
        enc = tokenizer(f"{text} {CASE.target}", return_offsets_mapping=True)
        start, end = enc["offset_mapping"][row.lookup]
        assert start < len(prefix) + text[len(prefix):].index("Epaspidoceras") + len("Epaspidoceras") <= end
        assert tokenizer.decode(list(row.answer_ids)).strip() == CASE.target
        assert row.answer[0] > row.lookup
    # a subject that ends inside a longer word resolves to the token covering its last character
    inside = EditCase("t/1", "Who were the Wattses?", "x", subject="Watts")
    (row,) = encode_rows(tokenizer, inside, [""], with_answer=False)
    enc = tokenizer(inside.prompt, return_offsets_mapping=True)
    start, end = enc["offset_mapping"][row.lookup]
    assert start <= inside.prompt.index("Watts") + 4 < end


def test_missing_subject_is_an_error_naming_the_case_or_a_chosen_fallback(tokenizer):
    case = EditCase("zsre/7", "Who is the author of Dune?", "Herbert", subject="Foundation")
    with pytest.raises(SubjectError, match=r"case zsre/7: subject 'Foundation' does not occur in the prompt"):
        encode_rows(tokenizer, case, [""], with_answer=False)
    (row,) = encode_rows(tokenizer, case, [""], with_answer=False, missing="prompt_last")
    assert row.lookup == len(row.ids) - 1
    no_subject = EditCase("x/1", "Who is the author of Dune?", "Herbert")
    with pytest.raises(SubjectError, match="case x/1: has no subject for the prompt"):
        encode_rows(tokenizer, no_subject, [""], with_answer=False)
    kl = encode_subject_row(tokenizer, no_subject, "{} is a")
    assert kl.lookup == len(kl.ids) - 1
    with pytest.raises(ValueError, match="missing_subject must be one of error, prompt_last"):
        encode_rows(tokenizer, case, [""], with_answer=False, missing="guess")
    with pytest.raises(ValueError, match="missing_subject must be one of"):
        LocateConfig(missing_subject="guess")


def test_aligned_rows_put_every_lookup_in_one_column(tokenizer):
    rows = [drop_last_token(r) for r in encode_rows(tokenizer, CASE, PREFIXES, True)]
    rows.append(encode_subject_row(tokenizer, CASE, "{} is a"))
    batch = align_rows(rows, pad_id=0)
    for i, row in enumerate(rows):
        shift = batch.cut - row.lookup
        assert batch.input_ids[i, batch.cut].item() == row.ids[row.lookup]
        assert batch.input_ids[i, shift:shift + len(row.ids)].tolist() == list(row.ids)
        assert batch.position_ids[i, shift:shift + len(row.ids)].tolist() == list(range(len(row.ids)))
        assert batch.attention_mask[i].sum().item() == len(row.ids)
        for t, token in enumerate(row.answer_ids):  # the column before each answer token predicts it
            column = batch.cut + batch.positions[i, t].item() + 1
            assert column == shift + row.answer[t] and batch.labels[i, t].item() == token
    assert (batch.labels[-1] == -100).all()  # the KL row scores no answer


@pytest.mark.parametrize("start", [0, 2, 3])
def test_tail_pass_matches_each_row_run_alone(any_tiny, start):
    rows = [drop_last_token(r) for r in encode_rows(any_tiny.tokenizer, CASE, PREFIXES, True)]
    rows.append(encode_subject_row(any_tiny.tokenizer, CASE, "{} is a"))
    batch = align_rows(rows, pad_id=0)
    tail = TailPass(any_tiny.adapter, batch.input_ids, batch.attention_mask, batch.position_ids, batch.cut, start)
    with torch.no_grad():
        first, replayed = tail(), tail()
    assert torch.equal(first, replayed)
    for i, row in enumerate(rows):
        ids = torch.tensor([row.ids])
        with torch.no_grad():
            alone, _ = forward_hidden(any_tiny.adapter, ids, torch.ones_like(ids))
        expected = alone[0, row.lookup:]
        torch.testing.assert_close(first[i, : expected.shape[0]], expected, rtol=1e-4, atol=1e-5)


def test_tail_pass_without_prefix_and_bad_cut(tiny_llama):
    ids = torch.tensor([[5, 6, 7, 8]])
    ones = torch.ones_like(ids)
    tail = TailPass(tiny_llama.adapter, ids, ones, torch.arange(4)[None], 0, 1)
    with torch.no_grad():
        expected, _ = forward_hidden(tiny_llama.adapter, ids, ones)
        torch.testing.assert_close(tail(), expected)
        torch.testing.assert_close(tail(), expected)
    with pytest.raises(ValueError, match="cut 4 must lie in"):
        TailPass(tiny_llama.adapter, ids, ones, torch.arange(4)[None], 4, 1)


def test_context_prefixes_are_sampled_once_per_model_and_seed(tiny_llama):
    first = context_prefixes(tiny_llama, [(5, 3), (4, 2)], seed=0)
    assert first[0] == "" and len(first) == 6 and all(p.endswith(". ") for p in first[1:])
    assert context_prefixes(tiny_llama, ((5, 3), (4, 2)), seed=0) is first
    assert context_prefixes(tiny_llama, [(5, 3), (4, 2)], seed=1) != first
    assert context_prefixes(tiny_llama, [], seed=0) == ("",)
    with pytest.raises(ValueError, match="context lengths"):
        context_prefixes(tiny_llama, [(1, 3)])


def test_lookup_activations_read_inputs_and_outputs_at_the_lookup(tiny_llama):
    rows = encode_rows(tiny_llama.tokenizer, CASE, PREFIXES, with_answer=False)
    module = tiny_llama.adapter.module("mlp_out", 2)
    seen = {}

    def spy(_module, args, output):
        seen.setdefault("in", []).append(args[0].detach())
        seen.setdefault("out", []).append(output.detach())

    handle = module.register_forward_hook(spy)
    keys, values = lookup_activations(tiny_llama, rows, [(module, "in"), (module, "out")], last_block=2)
    handle.remove()
    for i, row in enumerate(rows):
        torch.testing.assert_close(keys[i], seen["in"][0][i, row.lookup])
        torch.testing.assert_close(values[i], seen["out"][0][i, row.lookup])
    with pytest.raises(ValueError, match="were not reached"):
        lookup_activations(tiny_llama, rows, [(tiny_llama.adapter.module("mlp_out", 3), "in")], last_block=2)


def naive_value_losses(lm, case, module, prefixes, cfg, steps):
    """ROME's value optimisation written plainly: every row alone through the whole model."""
    rows = encode_rows(lm.tokenizer, case, prefixes, with_answer=True)
    kl_row = encode_subject_row(lm.tokenizer, case, cfg.kl_prompt)
    delta = torch.zeros(lm.model.config.hidden_size, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=cfg.lr)
    where = {}

    def inject(_m, _a, out):
        if "init" not in where:
            where["init"] = out[0, where["lookup"]].detach().clone()
        out = out.clone()
        out[0, where["lookup"]] += delta
        return out

    handle = module.register_forward_hook(inject)
    losses, extras, kl_init = [], [], None
    for step in range(steps + 1):  # the last pass measures the loss after the last update
        nll = []
        for row in rows:
            where["lookup"] = row.lookup
            logits = lm.model(torch.tensor([row.ids])).logits[0]
            logp = torch.log_softmax(logits[[j - 1 for j in row.answer]], dim=-1)
            nll.append(-logp[range(len(row.answer)), list(row.answer_ids)].mean())
        where["lookup"] = kl_row.lookup
        kl_logp = torch.log_softmax(lm.model(torch.tensor([kl_row.ids])).logits[0, kl_row.lookup], dim=-1)
        kl_init = kl_logp.detach() if kl_init is None else kl_init
        kl = (kl_logp.exp() * (kl_logp - kl_init)).sum()
        decay = cfg.weight_decay * delta.norm() / where["init"].norm() ** 2
        objective = torch.stack(nll).mean()
        loss = objective + cfg.kl_factor * kl + decay
        losses.append(objective.item())
        extras.append((cfg.kl_factor * kl + decay).item())
        if step == steps:
            break
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            limit = cfg.clamp_norm_factor * where["init"].norm()
            if delta.norm() > limit:
                delta.mul_(limit / delta.norm())
    handle.remove()
    return losses, extras, delta.detach()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_value_optimisation_matches_the_plain_algorithm(tokenizer, arch):
    from helpers import tiny_model

    lm = tiny_model(arch, tokenizer)
    cfg = LocateConfig(lr=0.05, steps=6, stop_loss=0.0, clamp_norm_factor=0.5, weight_decay=0.3)
    module = lm.adapter.module("mlp_out", 1)
    result = optimise_value(lm, CASE, module, 1, PREFIXES, CrossEntropy(), cfg)
    expected, extras, delta = naive_value_losses(lm, CASE, module, PREFIXES, cfg, 6)
    assert result.stats.steps == 6 and not result.stats.stopped_early
    assert result.stats.losses == pytest.approx(expected, rel=1e-4)  # the objective's loss alone
    assert result.stats.extra_losses == pytest.approx(extras, rel=1e-4, abs=1e-7)  # KL and weight decay apart
    torch.testing.assert_close(result.delta, delta, rtol=1e-4, atol=1e-6)
    assert result.stats.losses[-1] < result.stats.losses[0]
    assert result.delta.norm() <= 0.5 * result.init.norm() + 1e-5  # the clamp
    assert not any(p.requires_grad for p in lm.model.parameters()) and not module._forward_hooks


def test_value_optimisation_stops_early_and_takes_any_objective(tiny_llama):
    module = tiny_llama.adapter.module("mlp_out", 2)
    cfg = LocateConfig(steps=25, stop_loss=1e9)
    result = optimise_value(tiny_llama, CASE, module, 2, PREFIXES, CrossEntropy(), cfg)
    assert result.stats.stopped_early and result.stats.steps == 0 and len(result.stats.losses) == 1
    assert torch.equal(result.delta, torch.zeros_like(result.delta))
    clipped = optimise_value(tiny_llama, CASE, module, 2, PREFIXES, OverTone(OverToneConfig(epsilon=1e6)),
                             LocateConfig(steps=25, stop_loss=0.0, stop_when_clipped=True))
    assert clipped.stats.stopped_early and clipped.stats.steps == 0  # every target token clipped: nothing to learn
    assert clipped.stats.stop_reason == "clipped"
    host = optimise_value(tiny_llama, CASE, module, 2, PREFIXES, OverTone(OverToneConfig(epsilon=1e6)),
                          LocateConfig(steps=3, stop_loss=0.0))
    assert not host.stats.stopped_early and host.stats.steps == 3  # the host loop runs its budget
    exact = optimise_value(tiny_llama, CASE, module, 2, PREFIXES, CrossEntropy(), cfg, steps=2)
    assert exact.stats.steps == 2 and not exact.stats.stopped_early  # matched steps ignore the stop rule
    seen = []
    static = optimise_value(tiny_llama, CASE, module, 2, PREFIXES,
                            OverTone(OverToneConfig(dynamic=False, epsilon=0.0)), LocateConfig(steps=4, lr=0.05),
                            on_step=lambda info: seen.append((info.step, info.cases[0].case_id)))
    assert static.stats.steps == 4 and seen == [(0, "t/0"), (1, "t/0"), (2, "t/0"), (3, "t/0"), (4, "t/0")]



def test_value_optimisation_names_the_case_on_a_nan_loss(tiny_llama):
    module = tiny_llama.adapter.module("mlp_out", 2)
    with pytest.raises(EditError, match=r"case t/0: the nan loss is nan at step 0"):
        optimise_value(tiny_llama, CASE, module, 2, PREFIXES, NaNObjective(), LocateConfig())
    assert not module._forward_hooks
    with pytest.raises(ValueError, match="first context prefix must be the empty one"):
        optimise_value(tiny_llama, CASE, module, 2, PREFIXES[1:], CrossEntropy(), LocateConfig())
