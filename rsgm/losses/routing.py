"""Router losses of ExpertSim (thesis eqs. 5.6-5.7).

Both take the router's view of a batch: gate probabilities or (straight-through) one-hot
assignments of shape ``(B, N)`` for ``N`` experts.
"""

from __future__ import annotations

import torch


def utilisation_loss(probs: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """L_util = sum_i p̄_i log(p̄_i + eps), p̄ = batch mean of the gate probabilities.

    This is minus the entropy of the average routing distribution (eq. 5.6 with the sign
    the text intends, spec §2.4): minimising it *maximises* that entropy, so the router
    spreads the load over the experts. Its minimum, -log N, is reached at uniform use.
    """
    if probs.dim() != 2:
        raise ValueError(f"gate probabilities must have shape (batch, n_experts), got {tuple(probs.shape)}")
    mean = probs.mean(dim=0)
    return (mean * torch.log(mean + eps)).sum()


def expert_mean_intensities(intensity: torch.Tensor, assignment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean intensity f̄_in^(i) of the responses each expert produced in the batch.

    ``assignment`` ``(B, N)`` weights sample b for expert i: one-hot for a hard routing; a
    straight-through one-hot keeps its forward value and passes gradients to the router.
    Returns the ``N`` means and a mask of the experts that received any weight (the mean
    of an expert with no samples is undefined; it is returned as 0 and masked out).
    """
    if intensity.dim() != 1 or assignment.dim() != 2 or len(intensity) != len(assignment):
        raise ValueError(f"need intensity (B,) and assignment (B, N), got {tuple(intensity.shape)} and {tuple(assignment.shape)}")
    weight = assignment.sum(dim=0)
    used = weight.detach() > 0
    means = (assignment * intensity.unsqueeze(1)).sum(dim=0) / torch.where(used, weight, torch.ones_like(weight))
    return means, used


def differentiation_loss(intensity: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """L_diff = - sum_{i<j} (f̄_in^(i) - f̄_in^(j))^2 over the experts used in the batch (eq. 5.7).

    Minimising it spreads the experts' mean intensities apart. Experts without samples in
    the batch are left out; with fewer than two used experts the loss is 0.
    """
    means, used = expert_mean_intensities(intensity, assignment)
    means = means[used]
    diff = means.unsqueeze(0) - means.unsqueeze(1)
    # Each unordered pair appears twice in the full matrix.
    return -0.5 * (diff**2).sum()
