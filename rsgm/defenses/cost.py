"""B4B cost function (thesis eq. 6.1).

    sigma = f_{lam,alpha,beta}(C) = lam * ( exp( ln(alpha / lam) * C / beta ) - 1 ),   clipped at 0,

with C the coverage as a fraction.  f(0) = 0, f(beta) = alpha - lam, exponential growth beyond
beta.  Defaults (SimSiam): lam = 1e-6, alpha = 1, beta = 0.8.
"""
from __future__ import annotations

import math

# eq. 6.1 overflows for small beta; far below this cap the answer is pure noise anyway, and
# float32 answers stay finite (sigma * N(0, 1) < 3.4e38).
SIGMA_CAP = 1e30
SIGMA_EXPONENT_CAP = 700.0  # math.exp overflows past ~709.8; lam * e^700 is far above the cap


def b4b_sigma(coverage: float, lam: float = 1e-6, alpha: float = 1.0, beta: float = 0.8) -> float:
    """Noise standard deviation for a user of the given coverage (eq. 6.1)."""
    if not (lam > 0 and alpha > 0 and beta > 0):
        raise ValueError(f"b4b_sigma needs lam, alpha, beta > 0; got {lam}, {alpha}, {beta}")
    if not 0.0 <= coverage <= 1.0:
        raise ValueError(f"coverage must be a fraction in [0, 1], got {coverage}")
    exponent = math.log(alpha / lam) * coverage / beta
    if exponent > SIGMA_EXPONENT_CAP:  # math.exp would overflow (small beta)
        return SIGMA_CAP
    return min(SIGMA_CAP, max(0.0, lam * (math.exp(exponent) - 1.0)))
