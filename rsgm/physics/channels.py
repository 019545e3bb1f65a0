"""The five photomultiplier (PMT) channels of the ALICE Zero Degree Calorimeters.

Every second fibre feeds the common PMT (PMTc); the other fibres are grouped into four
quadrant bundles feeding PMT1-PMT4. A channel value is the number of photons its PMT
collects, i.e. the sum of the photon counts of the image pixels in its mask.

Default layout (``ChannelLayout()``), with ``i`` the row, ``j`` the column,
``mr = rows // 2`` and ``mc = cols // 2``:

========  ==========================================
channel   pixels
========  ==========================================
ch1       (i + j) odd,  rows ``mr:``, cols ``:mc``
ch2       (i + j) odd,  rows ``mr:``, cols ``mc:``
ch3       (i + j) odd,  rows ``:mr``, cols ``:mc``
ch4       (i + j) odd,  rows ``:mr``, cols ``mc:``
ch5       (i + j) even, whole image (PMTc)
========  ==========================================

Other ZDC codebases use the opposite parity and another quadrant order, so both are
parameters of :class:`ChannelLayout`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHANNEL_NAMES = ("ch1", "ch2", "ch3", "ch4", "ch5")
# Quadrant names: (row half, column half); "bottom" = rows mr:, "left" = cols :mc.
QUADRANTS = ("bottom_left", "bottom_right", "top_left", "top_right")


@dataclass(frozen=True)
class ChannelLayout:
    """Which pixels feed which PMT.

    Args:
        quadrant_parity: parity of ``i + j`` of the fibres feeding PMT1-4 (1 = odd); PMTc
            takes the other parity.
        quadrant_order: the quadrant feeding PMT1, PMT2, PMT3, PMT4, from ``QUADRANTS``.
    """

    quadrant_parity: int = 1
    quadrant_order: tuple[str, str, str, str] = QUADRANTS

    def __post_init__(self) -> None:
        if self.quadrant_parity not in (0, 1):
            raise ValueError(f"quadrant_parity must be 0 or 1, got {self.quadrant_parity}")
        if sorted(self.quadrant_order) != sorted(QUADRANTS):
            raise ValueError(f"quadrant_order must be a permutation of {QUADRANTS}, got {self.quadrant_order}")


def channel_masks(rows: int, cols: int, layout: ChannelLayout = ChannelLayout()) -> torch.Tensor:
    """Boolean masks of shape ``(5, rows, cols)``; every pixel belongs to exactly one channel."""
    i = torch.arange(rows).view(-1, 1)
    j = torch.arange(cols).view(1, -1)
    quad_fibre = (i + j) % 2 == layout.quadrant_parity
    mr, mc = rows // 2, cols // 2
    bottom, left = i >= mr, j < mc
    regions = {
        "bottom_left": bottom & left,
        "bottom_right": bottom & ~left,
        "top_left": ~bottom & left,
        "top_right": ~bottom & ~left,
    }
    quads = [quad_fibre & regions[name] for name in layout.quadrant_order]
    return torch.stack([*quads, ~quad_fibre])


def channel_values(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Photon sums per channel: images ``(N, H, W)`` or ``(N, 1, H, W)`` in photon-count
    space and masks ``(5, H, W)`` give ``(N, 5)``."""
    if images.dim() == 4:
        images = images.squeeze(1)
    if images.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"images of size {tuple(images.shape[-2:])} do not match channel masks of size {tuple(masks.shape[-2:])}")
    return torch.einsum("nhw,chw->nc", images.to(torch.float64), masks.to(torch.float64))
