"""B4B cost function (thesis eq. 6.1) and the Gaussian noise it drives.

    sigma = f_{lam,alpha,beta}(C) = lam * ( exp( ln(alpha / lam) * C / beta ) - 1 ),   clipped at 0,

with C the coverage as a fraction.  f(0) = 0, f(beta) = alpha - lam, exponential growth beyond
beta.  Defaults (SimSiam): lam = 1e-6, alpha = 1, beta = 0.8.
"""
from __future__ import annotations

import math

import torch


def b4b_sigma(coverage: float, lam: float = 1e-6, alpha: float = 1.0, beta: float = 0.8) -> float:
    """Noise standard deviation for a user of the given coverage (eq. 6.1)."""
    if not (lam > 0 and alpha > 0 and beta > 0):
        raise ValueError(f"b4b_sigma needs lam, alpha, beta > 0; got {lam}, {alpha}, {beta}")
    if not 0.0 <= coverage <= 1.0:
        raise ValueError(f"coverage must be a fraction in [0, 1], got {coverage}")
    return max(0.0, lam * (math.exp(math.log(alpha / lam) * coverage / beta) - 1.0))


def add_gaussian_noise(r: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """r + sigma * N(0, I): isotropic noise on every coordinate of the representation."""
    if sigma < 0 or not math.isfinite(sigma):
        raise ValueError(f"noise sigma must be finite and >= 0, got {sigma}")
    if sigma == 0:
        return r.clone()
    noise = torch.randn(r.shape, generator=generator, dtype=r.dtype, device="cpu").to(r.device)
    return r + sigma * noise
