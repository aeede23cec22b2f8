"""The shared optimisation loop: stop rules read the objective's loss, never a regulariser added to it."""

from __future__ import annotations

import pytest
import torch

from overtone.benchmarks import EditCase
from overtone.editors.training import default_stop, optimise
from overtone.objectives import CrossEntropy, OverTone, OverToneConfig

CASE = EditCase("t/0", "p", "a")


class FreeLogits:
    """A logit source whose logits are the trained parameters themselves: one target token, 8 classes."""

    def __init__(self) -> None:
        self.param = torch.zeros(1, 1, 8, requires_grad=True)
        self.labels = torch.tensor([[3]])
        self.reference = None

    def __call__(self) -> torch.Tensor:
        return self.param


def run(stop, extra=None, exact_steps=None, steps=50, check=None, objective=None):
    source = FreeLogits()
    optimiser = torch.optim.SGD([source.param], lr=1.0)

    def update(loss):
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    stats = optimise([CASE], objective or CrossEntropy(), source, update, steps, stop, extra_loss=extra,
                     check=check, exact_steps=exact_steps)
    return stats, source


def test_a_regulariser_does_not_move_the_loss_stop():
    """CE falls below 0.5 after a few steps; a constant regulariser of 1.0 added to it would never let
    objective + regulariser fall below 0.5, so a rule reading the sum would run all 50 steps."""
    plain, _ = run(default_stop(0.5, False))
    regularised, _ = run(default_stop(0.5, False), extra=lambda: torch.tensor(1.0))
    assert plain.stopped_early and plain.stop_reason == "loss" and 0 < plain.steps < 50
    assert regularised.steps == plain.steps and regularised.losses == plain.losses
    assert regularised.extra_losses == [1.0] * len(regularised.losses)  # recorded apart, per pass
    assert plain.extra_losses == []
    assert all(loss + 1.0 >= 0.5 for loss in regularised.losses)  # the sum never fell below the threshold


def test_stop_when_clipped_is_an_option_and_exact_steps_ignore_every_rule():
    clipped = OverTone(OverToneConfig(epsilon=1e6))
    host, _ = run(default_stop(0.0, False), steps=5, objective=clipped)
    assert host.steps == 5 and not host.stopped_early and host.stop_reason is None
    stop, _ = run(default_stop(0.0, True), objective=clipped)
    assert stop.steps == 0 and stop.stop_reason == "clipped" and len(stop.losses) == 1
    exact, _ = run(default_stop(1e9, True), exact_steps=7, objective=clipped)
    assert exact.steps == 7 and not exact.stopped_early and len(exact.losses) == 8  # and the final pass
    none, source = run(default_stop(0.0, False), exact_steps=0)
    assert none.steps == 0 and len(none.losses) == 1 and torch.equal(source.param, torch.zeros(1, 1, 8))
    with pytest.raises(ValueError, match="a step budget must be >= 0"):
        run(default_stop(0.0, False), exact_steps=-1)


def test_the_stop_decision_reads_the_check_pass_when_given():
    """An editor with dropout hands over a clean pass: here one whose loss is already tiny, so training stops
    at once although the training pass's own loss is large."""
    confident = torch.full((1, 1, 8), -20.0)
    confident[0, 0, 3] = 20.0
    stats, _ = run(default_stop(0.01, False), check=lambda: confident)
    assert stats.steps == 0 and stats.stop_reason == "loss" and stats.losses[0] > 1.0


class LearntLogits(FreeLogits):
    """``length`` target tokens the model already predicts with certainty: OverTone clips every one."""

    def __init__(self, length: int) -> None:
        self.labels = (torch.arange(length) % 8)[None]
        self.param = torch.full((1, length, 8), -30.0)
        self.param[0, torch.arange(length), self.labels[0]] = 30.0
        self.param.requires_grad_(True)
        self.reference = None


@pytest.mark.parametrize("clip_value, stops", [("floor", False), ("zero", True)])
def test_the_host_loss_stop_on_an_all_clipped_overtone_edit_does_not_depend_on_the_target_length(clip_value, stops):
    """FT-M's rule (loss below 0.01) against OverTone's floor ε = 0.01: compared in the loss's float32, an edit
    whose every token is clipped sits exactly at the floor, so it never stops on the loss (and always
    does when clipped tokens count zero); in float64 it stopped for some target lengths only."""
    objective = OverTone(OverToneConfig(lam=0.5, n_sigma=1.0, epsilon=0.01, clip_value=clip_value))
    for length in range(1, 200):
        source = LearntLogits(length)
        stats = optimise([CASE], objective, source, lambda loss: None, 3, default_stop(0.01, False))
        assert stats.stopped_early is stops and stats.steps == (0 if stops else 3), length
        assert stats.activity.get("clipped", 0) == (0 if stops else 3 * length)


def test_the_loss_stop_compares_in_float32():
    rule = default_stop(0.01, False)
    floor = float(torch.tensor(0.01, dtype=torch.float32))  # 0.009999999776...
    out = CrossEntropy()(torch.zeros(1, 1, 8), torch.tensor([[3]]))
    assert rule(floor, None, out) is None
    below = float(torch.nextafter(torch.tensor(floor), torch.tensor(0.0)))
    assert rule(below, None, out) == "loss"
