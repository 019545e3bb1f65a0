import math

import pytest
import torch

from rsgm.losses.gan import auxiliary_loss, discriminator_loss, diversity_loss, divco_loss, generator_adversarial_loss, intensity_loss


def test_adversarial_losses_by_hand():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sig = torch.sigmoid
    expected_d = -(torch.log(sig(real)).mean() + torch.log(1 - sig(fake)).mean())
    assert float(discriminator_loss(real, fake)) == pytest.approx(float(expected_d), rel=1e-6)
    assert float(generator_adversarial_loss(fake)) == pytest.approx(float(-torch.log(sig(fake)).mean()), rel=1e-6)


def test_diversity_loss_by_hand():
    z1, z2 = torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [1.0, 2.0]])  # d_z = 1, 0.5
    d1 = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    d2 = torch.tensor([[1.0, 3.0, 5.0], [0.0, 0.0, 0.0]])  # d_I = 2, 0
    w = torch.tensor([0.5, 1.0])
    expected = (0.5 * 1.0 / (2.0 + 1e-5) + 1.0 * 0.5 / 1e-5) / 2
    assert float(diversity_loss(w, z1, z2, d1, d2)) == pytest.approx(expected, rel=1e-6)
    # zero weight (a consistent condition under SDI-GAN) removes the term
    assert float(diversity_loss(torch.zeros(2), z1, z2, d1, d2)) == 0.0


def test_intensity_and_auxiliary_losses_by_hand():
    assert float(intensity_loss(torch.tensor([10.0, 4.0]), torch.tensor([7.0, 6.0]))) == pytest.approx(2.5)
    pred, target = torch.tensor([[0.5, 0.5], [0.0, 1.0]]), torch.tensor([[0.0, 0.5], [1.0, 0.0]])
    assert float(auxiliary_loss(pred, target)) == pytest.approx((0.25 + 2.0) / 2)
    assert math.isfinite(float(auxiliary_loss(pred, pred)))


def test_auxiliary_loss_in_pixel_units_by_hand():
    # peak stored as (row / 43, col / 43) on a 44x44 grid: errors of 1/43 and 2/43 are 1 and 2 pixels
    pred, target = torch.tensor([[1.0 / 43, 0.0]]), torch.tensor([[0.0, 2.0 / 43]])
    assert float(auxiliary_loss(pred, target, torch.tensor([43.0, 43.0]))) == pytest.approx(1.0 + 4.0)
    assert float(auxiliary_loss(pred, target)) == pytest.approx(5.0 / 43**2)
    # each coordinate has its own scale (56x30 proton grid: 55 rows, 29 columns)
    assert float(auxiliary_loss(torch.tensor([[0.1, 0.1]]), torch.zeros(1, 2), torch.tensor([55.0, 29.0]))) == pytest.approx(5.5**2 + 2.9**2)


def test_divco_loss_by_hand():
    anchor = torch.tensor([[2.0, 0.0], [0.0, 1.0]])             # normalised: (1, 0), (0, 1)
    positive = torch.tensor([[3.0, 4.0], [0.0, 5.0]])           # cos 0.6, 1.0
    negatives = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]],        # cos 0, -1
                              [[1.0, 0.0], [0.0, 1.0]]])        # cos 0, 1
    tau = 0.5
    e = math.exp
    row0 = -math.log(e(0.6 / tau) / (e(0.6 / tau) + e(0.0) + e(-1.0 / tau)))
    row1 = -math.log(e(1.0 / tau) / (e(1.0 / tau) + e(0.0) + e(1.0 / tau)))
    assert float(divco_loss(anchor, positive, negatives, tau)) == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # features are compared by direction only
    assert float(divco_loss(7 * anchor, positive, 0.1 * negatives, tau)) == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # a positive identical to the anchor and negatives opposite to it: near zero loss at a small temperature
    assert float(divco_loss(anchor, anchor, -anchor.unsqueeze(1), 0.05)) < 1e-6
    with pytest.raises(ValueError):
        divco_loss(anchor, positive, negatives[0], tau)
