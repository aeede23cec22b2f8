"""The OverTone objective's defining properties, pinned down numerically."""

from __future__ import annotations

import pytest
import torch

from overtone.objectives import IGNORE_INDEX, CrossEntropy, OverTone, OverToneConfig, top_n_sigma_mask
from overtone.objectives.base import FALLBACK_NONE, FALLBACK_NOT_MODE, FALLBACK_TIE

V = 50


def random_batch(seed: int = 0, b: int = 3, t: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, V, generator=gen) * 3
    labels = torch.randint(0, V, (b, t), generator=gen)
    labels[0, 3] = IGNORE_INDEX
    labels[2, 2:] = IGNORE_INDEX
    return logits, labels


def grad_of(objective, logits, labels, reference=None):
    z = logits.clone().requires_grad_(True)
    out = objective(z, labels, reference)
    out.loss.backward()
    return out, z.grad


def test_lambda_one_epsilon_zero_is_cross_entropy():
    logits, labels = random_batch()
    ce_out, ce_grad = grad_of(CrossEntropy(), logits, labels)
    ot_out, ot_grad = grad_of(OverTone(OverToneConfig(lam=1.0, epsilon=0.0)), logits, labels)
    torch.testing.assert_close(ot_out.loss, ce_out.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(ot_out.token_loss, ce_out.token_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(ot_grad, ce_grad, rtol=0, atol=1e-7)
    # and CE itself is the host editors' mean-per-example, mean-over-examples reduction
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    mask = labels.ne(IGNORE_INDEX)
    expected = ((nll * mask).sum(1) / mask.sum(1)).mean()
    torch.testing.assert_close(ce_out.loss, expected)


@pytest.mark.parametrize("cfg", [
    OverToneConfig(lam=0.3, n_sigma=1.0, epsilon=0.0),
    OverToneConfig(lam=0.1, n_sigma=0.5, epsilon=0.0, mode_check=False),
    OverToneConfig(lam=0.5, n_sigma=2.0, epsilon=0.0, filter=False),
])
def test_gradient_is_softmax_minus_target(cfg):
    # One token, sum reduction: d loss / d z = softmax(z) - target exactly.
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 1, V, generator=gen) * 2
    label = logits[0, 0].argmax()  # label is the mode, so the mixture is used
    labels = label.view(1, 1)
    objective = OverTone(OverToneConfig(**{**cfg.__dict__, "reduction": "sum"}))
    _, grad = grad_of(objective, logits, labels)
    target, mixed, *_ = objective.target(logits[0], labels[0])
    assert bool(mixed.all())
    torch.testing.assert_close(grad[0], torch.softmax(logits[0], -1) - target, rtol=0, atol=1e-6)


def test_no_gradient_below_epsilon_and_gradient_above():
    logits, labels = random_batch(2)
    # Make token (1, 0) nearly perfectly fitted: its KL to the one-hot is tiny.
    logits[1, 0] = -20.0
    logits[1, 0, labels[1, 0]] = 20.0
    objective = OverTone(OverToneConfig(lam=0.5, epsilon=0.05))
    out, grad = grad_of(objective, logits, labels)
    assert bool(out.clipped[1, 0])
    assert torch.count_nonzero(grad[1, 0]) == 0
    assert out.token_loss[1, 0] == pytest.approx(0.05)
    unclipped = out.mask & ~out.clipped
    assert bool(unclipped.any())
    for b, t in unclipped.nonzero().tolist():
        assert grad[b, t].abs().sum() > 0
    assert out.active_tokens == int(unclipped.sum())


def test_without_clip_nothing_is_clipped():
    logits, labels = random_batch(2)
    logits[1, 0] = -20.0
    logits[1, 0, labels[1, 0]] = 20.0
    out, _ = grad_of(OverTone(OverToneConfig(epsilon=0.05, clip=False)), logits, labels)
    assert not bool(out.clipped.any())
    assert out.token_loss[1, 0] < 0.05


@pytest.mark.parametrize("n_sigma", [0.0, 0.1, 1.0, 3.0, 100.0])
def test_filter_always_keeps_the_argmax(n_sigma):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, V, generator=gen) * 5
    keep = top_n_sigma_mask(logits, n_sigma)
    assert bool(keep.gather(-1, logits.argmax(-1, keepdim=True)).all())
    if n_sigma == 0.0:
        assert keep.sum(-1).eq(1).all()  # only the maximum survives
    if n_sigma == 100.0:
        assert keep.all()


def test_filter_is_population_std_threshold():
    logits = torch.tensor([[4.0, 3.0, 1.0, 0.0]])
    sigma = logits.std(unbiased=False)
    keep = top_n_sigma_mask(logits, 1.0)
    assert keep.tolist() == (logits >= 4.0 - sigma).tolist()


def test_filtered_prior_renormalises_over_kept_set():
    logits = torch.tensor([[5.0, 4.5, -3.0, -3.0, -4.0]])
    labels = torch.tensor([0])
    objective = OverTone(OverToneConfig(lam=0.0, n_sigma=0.5))
    target, _, kept, _ = objective.target(logits, labels)
    keep = top_n_sigma_mask(logits, 0.5)
    expected = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1)
    torch.testing.assert_close(target, expected)
    assert int(kept) == int(keep.sum())
    assert target[0, 2:].eq(0).all()


def test_fallback_to_one_hot_when_label_is_not_the_mode():
    logits = torch.tensor([[6.0, 1.0, 0.5, 0.0]])  # model prefers token 0
    labels = torch.tensor([1])  # the new answer is token 1
    objective = OverTone(OverToneConfig(lam=0.1, n_sigma=10.0))
    target, mixed, *_ = objective.target(logits, labels)
    assert not bool(mixed[0])
    torch.testing.assert_close(target, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    # without the mode check the mixture is used although it teaches the old answer
    unchecked = OverTone(OverToneConfig(lam=0.1, n_sigma=10.0, mode_check=False))
    target, mixed, *_ = unchecked.target(logits, labels)
    assert bool(mixed[0]) and int(target.argmax()) == 0


def test_tie_in_the_mixture_falls_back_by_default_and_mixes_with_tie_mix():
    # lam = 0.5 with a prior entirely on token 0: mixture is 0.5 / 0.5 between tokens 0 and 1.
    logits = torch.tensor([[50.0, -50.0, -50.0]])
    labels = torch.tensor([1])
    target, mixed, _, fallback = OverTone(OverToneConfig(lam=0.5, n_sigma=0.0)).target(logits, labels)
    assert not bool(mixed[0]) and int(fallback[0]) == FALLBACK_TIE
    assert target[0, 1] == 1.0
    target, mixed, _, fallback = OverTone(OverToneConfig(lam=0.5, n_sigma=0.0, tie="mix")).target(logits, labels)
    assert bool(mixed[0]) and int(fallback[0]) == FALLBACK_NONE
    torch.testing.assert_close(target, torch.tensor([[0.5, 0.5, 0.0]]))


def test_fallback_reasons_and_a_one_hot_prior_are_told_apart():
    logits = torch.tensor([[6.0, 1.0, 0.5, 0.0],  # label 1 outside the kept set {0}: not the mode at lam 0.3
                           [-50.0, 50.0, -50.0, -50.0]])  # label 1 is the whole kept set: the target is one-hot
    labels = torch.tensor([1, 1])
    _, mixed, kept, fallback = OverTone(OverToneConfig(lam=0.3, n_sigma=0.5)).target(logits, labels)
    assert fallback.tolist() == [FALLBACK_NOT_MODE, FALLBACK_NONE]
    assert mixed.tolist() == [False, False]  # the second passed the check, but its target is the one-hot
    assert kept.tolist() == [1, 1]


def test_mode_check_can_act_at_lambda_one_half_only_when_ties_fall_back():
    assert OverToneConfig(lam=0.1).mode_check_can_act
    assert OverToneConfig(lam=0.5).mode_check_can_act
    assert not OverToneConfig(lam=0.5, tie="mix").mode_check_can_act
    assert not OverToneConfig(lam=0.6).mode_check_can_act
    assert not OverToneConfig(lam=0.1, mode_check=False).mode_check_can_act


@pytest.mark.parametrize("name, value", [("tie", "coin"), ("clip_value", "half"), ("clip_test", "margin")])
def test_unknown_choices_of_the_silent_settings_are_refused(name, value):
    with pytest.raises(ValueError, match=name):
        OverToneConfig(**{name: value})


def test_clip_test_prob_clips_on_the_label_probability():
    # a static prior split between tokens 0 and 1 makes the target (0.25, 0.75) while the model is sure of 1:
    # the KL is far above epsilon, p(label) above 1 - epsilon
    logits = torch.tensor([[0.0, 9.0, 4.0, -9.0]])
    reference = torch.tensor([[5.0, 5.0, -5.0, -5.0]])
    labels = torch.tensor([1])
    eps = 0.05
    assert float(torch.softmax(logits, -1)[0, 1]) > 1 - eps
    settings = {"lam": 0.5, "n_sigma": 0.5, "epsilon": eps, "dynamic": False}
    kl_scores = OverTone(OverToneConfig(**settings)).token_losses(logits, labels, reference)
    prob_scores = OverTone(OverToneConfig(**settings, clip_test="prob")).token_losses(logits, labels, reference)
    assert bool(kl_scores.mixed[0]) and float(kl_scores.loss[0]) > 1.0 and not bool(kl_scores.clipped[0])
    assert bool(prob_scores.clipped[0]) and float(prob_scores.loss[0]) == pytest.approx(eps)


@pytest.mark.parametrize("clip_value, floor", [("floor", 0.01), ("zero", 0.0)])
def test_an_edit_whose_every_token_is_clipped_has_the_floor_as_its_loss_at_every_length(clip_value, floor):
    """float32(0.01) averaged over T tokens used to round above or below it depending on T (29 lengths of
    1..199 above), so FT-M's stop at 0.01 fired for some target lengths and not for others."""
    objective = OverTone(OverToneConfig(lam=0.5, n_sigma=1.0, epsilon=0.01, clip_value=clip_value))
    for length in range(1, 200):
        labels = torch.arange(length) % 7
        logits = torch.full((1, length, 7), -30.0)
        logits[0, torch.arange(length), labels] = 30.0  # every token learnt: all clipped
        out = objective(logits, labels[None])
        assert bool(out.clipped.all())
        assert out.loss.item() == float(torch.tensor(floor, dtype=torch.float32)), length
        assert out.group_loss(slice(0, 1)).item() == out.loss.item()


def test_activity_counts_mixed_fallback_and_clipped_tokens():
    logits = torch.tensor([[[6.0, 1.0, 0.5, 0.0], [50.0, -50.0, -50.0, -50.0], [-50.0, 50.0, -50.0, -50.0],
                            [2.0, 2.5, 0.0, -1.0]]])
    labels = torch.tensor([[1, 1, 1, 1]])
    out = OverTone(OverToneConfig(lam=0.5, n_sigma=0.5))(logits, labels)
    # at lam 0.5 the label holds half the mixture, so the check can fail only by a tie (rows 1 and 2)
    assert out.activity() == {"tokens": 4, "mixed": 1, "clipped": 1, "fallback_mode": 0, "fallback_tie": 2}
    ce = CrossEntropy()(logits, labels).activity()
    assert ce == {"tokens": 4, "mixed": 0, "clipped": 0, "fallback_mode": 0, "fallback_tie": 0}


def test_target_never_pushes_the_label_down():
    logits, labels = random_batch(4, b=8, t=6)
    labels = labels.clamp_min(0)
    objective = OverTone(OverToneConfig(lam=0.2, n_sigma=1.0))
    flat_logits, flat_labels = logits.reshape(-1, V), labels.reshape(-1)
    target, *_ = objective.target(flat_logits, flat_labels)
    p_label = torch.softmax(flat_logits, -1).gather(-1, flat_labels[:, None]).squeeze(-1)
    t_label = target.gather(-1, flat_labels[:, None]).squeeze(-1)
    assert bool((t_label >= p_label - 1e-6).all())


def test_masked_positions_are_ignored():
    logits, labels = random_batch(5)
    objective = OverTone(OverToneConfig(lam=0.3, epsilon=0.0))
    out, grad = grad_of(objective, logits, labels)
    ignored = labels.eq(IGNORE_INDEX)
    assert grad[ignored].abs().sum() == 0
    assert out.token_loss[ignored].abs().sum() == 0
    scrambled = logits.clone()
    scrambled[ignored] = torch.randn_like(scrambled[ignored]) * 100
    torch.testing.assert_close(objective(scrambled, labels).loss, out.loss)


def test_no_filter_uses_the_full_softmax():
    logits, labels = random_batch(6)
    out = OverTone(OverToneConfig(filter=False))(logits, labels)
    assert out.kept[out.mask].eq(V).all()


def test_static_target_uses_the_reference_logits():
    logits, labels = random_batch(7)
    static = OverTone(OverToneConfig(lam=0.3, epsilon=0.0, dynamic=False))
    dynamic = OverTone(OverToneConfig(lam=0.3, epsilon=0.0))
    with pytest.raises(ValueError, match="reference"):
        static(logits, labels)
    # same logits as reference: identical loss to the dynamic target
    torch.testing.assert_close(static(logits, labels, logits).loss, dynamic(logits, labels).loss)
    # another reference changes the target, hence the loss
    other = logits + torch.randn_like(logits)
    assert not torch.allclose(static(logits, labels, other).loss, dynamic(logits, labels).loss)


def test_reduction_sum_and_mean():
    logits, labels = random_batch(8)
    mean = OverTone(OverToneConfig(epsilon=0.0))(logits, labels)
    total = OverTone(OverToneConfig(epsilon=0.0, reduction="sum"))(logits, labels)
    mask = labels.ne(IGNORE_INDEX)
    per_ex = mean.token_loss.sum(1)
    torch.testing.assert_close(total.loss, per_ex.mean())
    torch.testing.assert_close(mean.loss, (per_ex / mask.sum(1)).mean())


@pytest.mark.parametrize("kwargs", [{"lam": 1.5}, {"lam": -0.1}, {"n_sigma": -1}, {"epsilon": -0.01}])
def test_invalid_settings_are_rejected(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        OverToneConfig(**kwargs)


def test_all_labels_ignored_is_an_error():
    logits, labels = random_batch(9)
    with pytest.raises(ValueError, match="no target tokens"):
        CrossEntropy()(logits, torch.full_like(labels, IGNORE_INDEX))


def test_low_precision_logits_are_scored_in_fp32():
    logits, labels = random_batch(10)
    out32 = OverTone()(logits, labels)
    out16 = OverTone()(logits.bfloat16(), labels)
    assert out16.loss.dtype == torch.float32
    torch.testing.assert_close(out16.loss, out32.loss, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("cfg", [
    OverToneConfig(lam=0.5, n_sigma=1.0, epsilon=0.05),
    OverToneConfig(lam=0.1, n_sigma=0.5, epsilon=0.05),
    OverToneConfig(lam=0.3, n_sigma=2.0, epsilon=0.05, dynamic=False),
])
def test_gradient_terms_sum_to_the_token_gradient(cfg):
    logits, labels = random_batch(11)
    logits[1, 0] = -20.0  # one token fitted below epsilon: clipped, no gradient
    logits[1, 0, labels[1, 0]] = 20.0
    mask = labels.ne(IGNORE_INDEX)
    z, y = logits[mask], labels[mask]
    fitted = int(mask[0].sum())  # token (1, 0) among the scored tokens
    ref = None
    if not cfg.dynamic:  # another prior for every token but the fitted one
        ref = z + torch.randn_like(z)
        ref[fitted] = z[fitted]
    objective = OverTone(cfg)
    leaf = z.clone().requires_grad_(True)
    loss, clipped, _, _, fallback = objective.token_losses(leaf, y, ref)
    checked = fallback == 0  # the mode check kept the mixture
    loss.sum().backward()
    label_term, filter_term = objective.gradient_terms(z, y, ref)
    torch.testing.assert_close(label_term + filter_term, leaf.grad, rtol=0, atol=1e-6)
    assert bool(clipped[fitted])
    assert torch.count_nonzero(label_term[fitted]) == 0 and torch.count_nonzero(filter_term[fitted]) == 0
    # a token whose target fell back to the one-hot gets no filter term, a mixture one (unclipped) does
    assert torch.count_nonzero(filter_term[~checked]) == 0
    assert filter_term[checked & ~clipped].abs().sum(-1).gt(0).all()


def test_filter_term_vanishes_without_the_filter_and_sharpens_with_it():
    logits, labels = random_batch(12)
    mask = labels.ne(IGNORE_INDEX)
    labels = torch.where(mask, logits.argmax(-1), labels)  # the label is the mode: every target is mixed
    z, y = logits[mask], labels[mask]
    _, no_filter = OverTone(OverToneConfig(lam=0.5, epsilon=0.0, filter=False)).gradient_terms(z, y)
    assert torch.count_nonzero(no_filter.abs() > 1e-7) == 0  # pi_flt = p: nothing but the scaled CE pull
    objective = OverTone(OverToneConfig(lam=0.5, n_sigma=1.0, epsilon=0.0))
    _, filter_term = objective.gradient_terms(z, y)
    assert filter_term.abs().sum(-1).gt(0).all()
    # a small step against the filter term moves probability mass from outside the kept set into it
    outside = ~top_n_sigma_mask(z, 1.0)
    before = (torch.softmax(z, -1) * outside).sum(-1)
    after = (torch.softmax(z - 0.1 * filter_term, -1) * outside).sum(-1)
    assert (after < before).all()
