"""Table 4.4.1 statistics of the synthetic 2-D benchmark."""

from __future__ import annotations

import torch

from rsgm.metrics.wasserstein import wasserstein_1d


def synthetic2d_report(real: torch.Tensor, fake: torch.Tensor, label: torch.Tensor, spread: torch.Tensor) -> dict[str, float]:
    """Per spread value s: ``var_spread{s}``, the variance of the generated points of each
    class (mean of the two coordinates' unbiased variances), averaged over classes, its
    real counterpart ``real_var_spread{s}``, and ``w1_spread{s}``, the 1-D W1 between real
    and generated points per class and coordinate, averaged. Real and generated rows are
    paired by condition."""
    out: dict[str, float] = {}
    for s in (0, 1):
        variances, real_variances, w1 = [], [], []
        for c in torch.unique(label[spread == s]):
            rows = (spread == s) & (label == c)
            variances.append(fake[rows].double().var(dim=0).mean())
            real_variances.append(real[rows].double().var(dim=0).mean())
            w1 += [wasserstein_1d(real[rows, d], fake[rows, d]) for d in range(real.shape[1])]
        out[f"var_spread{s}"] = float(torch.stack(variances).mean())
        out[f"real_var_spread{s}"] = float(torch.stack(real_variances).mean())
        out[f"w1_spread{s}"] = float(torch.stack(w1).mean())
    return out
