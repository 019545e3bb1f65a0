"""Per-sample quantities precomputed from ZDC responses (thesis §4.3 and §5.3)."""

from __future__ import annotations

import numpy as np
import torch


def photon_sum(images: np.ndarray) -> np.ndarray:
    """f_in(x) = sum_ij x_ij, the total photon count of each image (eq. 5.2)."""
    return images.reshape(len(images), -1).sum(axis=1, dtype=np.float64)


def peak_pixel(images: np.ndarray) -> np.ndarray:
    """(row, col) of the brightest pixel of each image (the auxiliary target, eq. 5.4).

    Ties resolve to the first pixel in row-major order; an empty image gives (0, 0)."""
    flat = images.reshape(len(images), -1).argmax(axis=1)
    return np.stack(np.unravel_index(flat, images.shape[1:]), axis=1).astype(np.int64)


def condition_groups(conditions: np.ndarray) -> np.ndarray:
    """Integer id per row, equal for rows whose full condition vectors are identical."""
    _, inverse = np.unique(conditions, axis=0, return_inverse=True)
    return inverse.reshape(-1)


def per_condition_diversity(values: np.ndarray, groups: np.ndarray, fit_rows: np.ndarray | None = None,
                            chunk_groups: int = 4096) -> np.ndarray:
    """The diversity weight f_div of every row (thesis eq. 4.3).

    f_div(c) = sum_ij sqrt(1/|X_c| sum_t (x^t_ij - mu_ij)^2): the population std of every
    pixel over the images X_c sharing condition c, summed over pixels. Values are then
    min-max scaled over the unique conditions into [0, 1]; conditions seen once have std 0,
    so this equals dividing by the largest value.

    Args:
        values: ``(N, ...)`` responses (pixels, or points for the 2-D benchmark).
        groups: ``(N,)`` condition-group id of each row (see :func:`condition_groups`).
        fit_rows: boolean ``(N,)``; only these rows (the training split) enter the
            statistics. Rows whose group has no fitted row get 0.
    """
    n = len(values)
    flat = torch.from_numpy(np.ascontiguousarray(values.reshape(n, -1)))
    fit_rows = np.ones(n, dtype=bool) if fit_rows is None else np.asarray(fit_rows, dtype=bool)
    n_groups = int(groups.max()) + 1 if n else 0
    counts = np.bincount(groups[fit_rows], minlength=n_groups)
    raw = np.zeros(n_groups, dtype=np.float64)
    repeated = np.flatnonzero(counts > 1)
    for start in range(0, len(repeated), chunk_groups):
        chunk = repeated[start:start + chunk_groups]
        slot = np.full(n_groups, -1)
        slot[chunk] = np.arange(len(chunk))
        rows = np.flatnonzero(fit_rows & (slot[groups] >= 0))
        index = torch.from_numpy(slot[groups[rows]])
        x = flat[rows].to(torch.float64)
        total = torch.zeros(len(chunk), flat.shape[1], dtype=torch.float64).index_add_(0, index, x)
        total_sq = torch.zeros_like(total).index_add_(0, index, x * x)
        k = torch.from_numpy(counts[chunk]).to(torch.float64).unsqueeze(1)
        var = (total_sq / k - (total / k) ** 2).clamp_min(0.0)
        raw[chunk] = var.sqrt().sum(dim=1).numpy()
    seen = counts > 0
    low, high = (raw[seen].min(), raw[seen].max()) if seen.any() else (0.0, 0.0)
    scaled = np.where(seen, (raw - low) / (high - low), 0.0) if high > low else np.zeros_like(raw)
    return scaled[groups]
