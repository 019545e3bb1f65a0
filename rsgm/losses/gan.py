"""Loss terms of the conditional-GAN family (thesis eqs. 4.1-4.5 and 5.1-5.5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def discriminator_loss(real_logit: torch.Tensor, fake_logit: torch.Tensor) -> torch.Tensor:
    """-E[log D(x, c)] - E[log(1 - D(G(z, c), c))] (eq. 4.1, the discriminator's side)."""
    return (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
            + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)))


def generator_adversarial_loss(fake_logit: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss -E[log D(G(z, c), c)]."""
    return F.binary_cross_entropy_with_logits(fake_logit, torch.ones_like(fake_logit))


def diversity_loss(weight: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor,
                   eps: float = 1e-5) -> torch.Tensor:
    """Batch mean of w(c) * d_z(z1, z2) / (d_I(x1, x2) + eps) (eqs. 4.2, 4.4, 5.1).

    ``d1``/``d2`` are the two outputs for the same condition (pixels, or discriminator
    features for the encoder distance of eq. 4.7); both distances are mean absolute
    differences per sample. ``weight`` is f_div(c) for SDI-GAN and 1 for MS-GAN.
    """
    d_z = (z1 - z2).abs().flatten(1).mean(1)
    d_i = (d1 - d2).abs().flatten(1).mean(1)
    return (weight * d_z / (d_i + eps)).mean()


def intensity_loss(generated_sum: torch.Tensor, real_sum: torch.Tensor) -> torch.Tensor:
    """L_in = mean |f_in(x_c) - f_in(x^_c)| over the batch, photon sums (eq. 5.3)."""
    return (generated_sum - real_sum).abs().mean()


def auxiliary_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_aux = 1/N_b sum_i (k^_i - k_i)^2 + (l^_i - l_i)^2 for peak coordinates (eq. 5.4)."""
    return ((predicted - target) ** 2).sum(dim=1).mean()
