"""Loss values against hand-computed cases (plain float math, no torch in the expectations)."""

import math

import pytest
import torch

from onmerge_megatron.training.losses import (
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    paired_loss,
    sft_loss,
)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


T = lambda *xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731

# Two pairs: policy and reference log-probs of chosen and rejected responses.
PC, PR, RC, RR = T(-10.0, -4.0), T(-12.0, -3.0), T(-11.0, -5.0), T(-11.5, -2.0)
# log-ratios: chosen (1.0, 1.0), rejected (-0.5, -1.0); DPO logits d = (1.5, 2.0)


def test_dpo_sigmoid_hand_computed():
    out = dpo_loss(PC, PR, RC, RR, beta=0.1)
    expected = [-logsig(0.1 * 1.5), -logsig(0.1 * 2.0)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, 0.1])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.05, -0.1])
    # At policy == reference the loss is log 2 whatever beta.
    assert dpo_loss(RC, RR, RC, RR, beta=0.7).losses.tolist() == pytest.approx([math.log(2)] * 2)


def test_dpo_label_smoothing_hand_computed():
    eps, beta = 0.2, 0.5
    out = dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=eps)
    expected = [-(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d) for d in (1.5, 2.0)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    # eps = 0.5 makes the loss symmetric: the same for d and -d.
    flipped = dpo_loss(PR, PC, RR, RC, beta=beta, label_smoothing=0.5).losses
    assert flipped.tolist() == pytest.approx(dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=0.5).losses.tolist())


def test_ipo_uses_length_normalised_logratios():
    beta = 0.1
    chosen_len, rejected_len = T(2.0, 4.0), T(5.0, 1.0)
    out = ipo_loss(PC, PR, RC, RR, chosen_len, rejected_len, beta=beta)
    # pair 0: 1.0/2 - (-0.5)/5 = 0.6 ; pair 1: 1.0/4 - (-1.0)/1 = 1.25 ; target 1/(2 beta) = 5
    expected = [(0.6 - 5.0) ** 2, (1.25 - 5.0) ** 2]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)


def test_hinge_hand_computed():
    out = hinge_loss(PC, PR, RC, RR, beta=0.5)
    assert out.losses.tolist() == pytest.approx([max(0.0, 1 - 0.5 * 1.5), max(0.0, 1 - 0.5 * 2.0)])
    out = hinge_loss(PC, PR, RC, RR, beta=1.0)
    assert out.losses.tolist() == pytest.approx([0.0, 0.0])


def test_paired_loss_dispatch_and_unknown_name():
    a = paired_loss("dpo", PC, PR, RC, RR, T(1, 1), T(1, 1), beta=0.1).losses
    assert torch.equal(a, dpo_loss(PC, PR, RC, RR, beta=0.1).losses)
    with pytest.raises(ValueError, match="unknown paired loss"):
        paired_loss("orpo", PC, PR, RC, RR, T(1, 1), T(1, 1), beta=0.1)


def test_kto_hand_computed():
    policy, ref = T(-3.0, -7.0, -2.0), T(-4.0, -6.0, -2.5)  # log-ratios 1.0, -1.0, 0.5
    desirable = torch.tensor([True, False, False])
    kl = torch.tensor(0.2, dtype=torch.float64)
    beta, wd, wu = 0.1, 1.0, 1.33
    out = kto_loss(policy, ref, desirable, kl, beta, wd, wu)
    expected = [wd * (1 - sig(beta * (1.0 - 0.2))), wu * (1 - sig(beta * (0.2 - (-1.0)))), wu * (1 - sig(beta * (0.2 - 0.5)))]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.rewards.tolist() == pytest.approx([0.1, -0.1, 0.05])


def test_kto_kl_estimate_is_clamped_and_detached():
    p = torch.tensor([-1.0, -2.0], requires_grad=True)
    assert kto_kl_estimate(p, torch.tensor([-1.5, -2.5])).item() == pytest.approx(0.5)
    assert kto_kl_estimate(p, torch.tensor([0.0, 0.0])).item() == 0.0  # mean -1.5 clamps to 0
    assert not kto_kl_estimate(p, torch.tensor([-1.5, -2.5])).requires_grad


def test_sft_term_is_mean_token_nll():
    logps, lengths = T(-6.0, -2.0), T(3.0, 1.0)
    assert sft_loss(logps, lengths).item() == pytest.approx(8.0 / 4.0)


def test_dpo_gradient_sign_pushes_chosen_up():
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([-5.0], requires_grad=True)
    dpo_loss(pc, pr, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.1).losses.sum().backward()
    # d loss / d pc = -beta * sigmoid(-beta d) = -0.05 at d = 0; opposite for rejected.
    assert pc.grad.item() == pytest.approx(-0.05)
    assert pr.grad.item() == pytest.approx(0.05)
