"""The two spaces of a ZDC response: photon counts and the generators' ``log(1 + x)`` space."""

from __future__ import annotations

import torch


def images_to_model_space(counts: torch.Tensor) -> torch.Tensor:
    """Photon counts -> the ``log(1 + x)`` space the generators work in."""
    return torch.log1p(counts)


def model_space_to_counts(x: torch.Tensor) -> torch.Tensor:
    """Generator output -> photon counts (``exp(x) - 1``, clipped at 0)."""
    return torch.expm1(x).clamp_min(0.0)
