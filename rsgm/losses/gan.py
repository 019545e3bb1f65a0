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


def auxiliary_loss(predicted: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """L_aux = 1/N_b sum_i (k^_i - k_i)^2 + (l^_i - l_i)^2 for peak coordinates (eq. 5.4).

    ``scale`` ``(2,)`` multiplies each coordinate's error first: with coordinates stored in
    [0, 1] (row / (H - 1), col / (W - 1)), ``scale = (H - 1, W - 1)`` gives eq. 5.4 in pixel
    units; ``None`` keeps the stored units.
    """
    error = predicted - target
    if scale is not None:
        error = error * scale.to(error)
    return (error ** 2).sum(dim=1).mean()


def divco_loss(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """DivCo's latent-augmented contrastive loss (Liu et al., CVPR 2021; thesis §4.2 baseline).

    For every sample b, with f = feature / ||feature|| (discriminator features of G(c, z)):

        L_b = -log( exp(f_b . f_b+ / tau) / (exp(f_b . f_b+ / tau) + sum_j exp(f_b . f_bj- / tau)) )

    ``anchor`` ``(B, F)`` are the features of G(c, z), ``positive`` ``(B, F)`` those of
    G(c, z+) with z+ close to z, ``negatives`` ``(B, K, F)`` those of G(c, z_j-) with
    independent z_j-; the same condition c throughout a row. Minimising it makes outputs of
    nearby codes similar and outputs of distant codes dissimilar. Returns the batch mean.
    """
    if anchor.dim() != 2 or positive.shape != anchor.shape or negatives.dim() != 3 or negatives.shape[0] != anchor.shape[0]:
        raise ValueError(f"need anchor (B, F), positive (B, F), negatives (B, K, F); got {tuple(anchor.shape)}, "
                         f"{tuple(positive.shape)}, {tuple(negatives.shape)}")
    a, p, n = F.normalize(anchor, dim=-1), F.normalize(positive, dim=-1), F.normalize(negatives, dim=-1)
    logits = torch.cat([(a * p).sum(-1, keepdim=True), torch.einsum("bf,bkf->bk", a, n)], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(a), dtype=torch.long, device=a.device))
