"""1-D Wasserstein distance between ZDC channel values of real and generated responses."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from rsgm.physics.channels import ChannelLayout, channel_masks, channel_values


def wasserstein_1d(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """W1 = integral |F_u(t) - F_v(t)| dt between the empirical distributions of two 1-D
    samples (sizes may differ); equals ``scipy.stats.wasserstein_distance(u, v)``."""
    if u.numel() == 0 or v.numel() == 0:
        raise ValueError("wasserstein_1d needs two non-empty samples")
    u, v = u.flatten().double().sort().values, v.flatten().double().sort().values
    points = torch.cat([u, v]).sort().values
    deltas = points.diff()
    cdf_u = torch.searchsorted(u, points[:-1], right=True).double() / u.numel()
    cdf_v = torch.searchsorted(v, points[:-1], right=True).double() / v.numel()
    return ((cdf_u - cdf_v).abs() * deltas).sum()


def channel_wasserstein(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Per-channel W1 between channel-value tables ``(N, C)`` and ``(M, C)``; returns ``(C,)``."""
    return torch.stack([wasserstein_1d(real[:, c], fake[:, c]) for c in range(real.shape[1])])


def quartile_wasserstein(real: torch.Tensor, fake: torch.Tensor, intensity: torch.Tensor,
                         edges: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean channel W1 within each intensity quartile (thesis Table 5.4.1 protocol).

    Real and generated responses are paired by condition (row), and each pair falls into
    the quartile of the real response's photon sum. ``edges`` are the 5 quartile edges;
    by default the quartiles of ``intensity``. Returns (``(4,)`` W1 per quartile, edges);
    an empty quartile gives NaN.
    """
    if edges is None:
        edges = torch.quantile(intensity.double(), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    edges = edges.double()
    # Right-closed bins, so the maximum lands in Q4 and the minimum in Q1.
    bins = torch.bucketize(intensity.double(), edges[1:-1], right=False).clamp(0, 3)
    out = torch.full((4,), float("nan"), dtype=torch.float64)
    for q in range(4):
        rows = bins == q
        if rows.any():
            out[q] = channel_wasserstein(real[rows], fake[rows]).mean()
    return out, edges


def deduplicate(index: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Keep the first row of every sample index (DistributedSampler pads with repeats)."""
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    first = torch.ones_like(sorted_index, dtype=torch.bool)
    first[1:] = sorted_index[1:] != sorted_index[:-1]
    keep = order[first]
    return (index[keep], *(t[keep] for t in tensors))


class ChannelWasserstein(Metric):
    """Per-channel W1 between real and generated ZDC responses, exact under DDP.

    ``update(real, fake, index)`` takes photon-count images ``(B, [1,] H, W)`` paired by
    condition and the samples' dataset indices; only the 5 channel values per image are
    kept (``cat`` states), duplicates of an index are dropped before computing.

    ``compute()`` returns a dict: ``w1`` (5 per-channel values), ``w1_mean``,
    ``w1_quartiles`` (4 values), ``quartile_edges``, and the de-duplicated ``real`` /
    ``fake`` channel tables for plotting.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, image_shape: tuple[int, int], layout: ChannelLayout = ChannelLayout(),
                 quartile_edges: list[float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_buffer("masks", channel_masks(*image_shape, layout), persistent=False)
        self.quartile_edges = None if quartile_edges is None else torch.tensor(quartile_edges, dtype=torch.float64)
        for name in ("real", "fake", "intensity", "index"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, real: torch.Tensor, fake: torch.Tensor, index: torch.Tensor) -> None:
        if real.shape != fake.shape:
            raise ValueError(f"real images {tuple(real.shape)} and generated images {tuple(fake.shape)} differ in shape")
        if len(index) != len(real):
            raise ValueError(f"{len(index)} indices for {len(real)} images")
        self.real.append(channel_values(real, self.masks))
        self.fake.append(channel_values(fake, self.masks))
        self.intensity.append(real.flatten(1).double().sum(1))
        self.index.append(index.long())

    def compute(self) -> dict[str, torch.Tensor]:
        _, real, fake, intensity = deduplicate(dim_zero_cat(self.index), dim_zero_cat(self.real),
                                               dim_zero_cat(self.fake), dim_zero_cat(self.intensity))
        w1 = channel_wasserstein(real, fake)
        w1_q, edges = quartile_wasserstein(real, fake, intensity, self.quartile_edges)
        return {"w1": w1, "w1_mean": w1.mean(), "w1_quartiles": w1_q, "quartile_edges": edges,
                "real": real, "fake": fake}
