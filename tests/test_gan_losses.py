import math

import pytest
import torch

from rsgm.losses.gan import auxiliary_loss, discriminator_loss, diversity_loss, generator_adversarial_loss, intensity_loss


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
