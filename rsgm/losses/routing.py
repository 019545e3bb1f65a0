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


def rescale_intensity(intensity: torch.Tensor, real_intensity: torch.Tensor, scale: float | None) -> torch.Tensor:
    """L_diff's intensity unit: photon sums rescaled so that the mean of ``real_intensity``
    (the batch's real photon sums) becomes ``scale``; ``scale=None`` keeps raw counts."""
    if scale is None:
        return intensity
    return intensity * (scale / real_intensity.mean().clamp_min(1.0))


def differentiation_loss(intensity: torch.Tensor, assignment: torch.Tensor, share_weighted: bool = False) -> torch.Tensor:
    """L_diff = - sum_{i<j} (f̄_in^(i) - f̄_in^(j))^2 over the experts used in the batch (eq. 5.7).

    Minimising it spreads the experts' mean intensities apart. Experts without samples in
    the batch are left out; with fewer than two used experts the loss is 0.

    ``share_weighted`` weights each pair by the experts' shares of the batch, ``w_i w_j``:
    the sum is then the between-expert variance of the intensities. Eq. 5.7 as printed
    grows without bound as one expert keeps ever fewer, ever brighter samples (its mean
    moves to the tail); the weighted form gives a near-empty expert no credit, and its
    optimum sorts the samples into intensity bands.
    """
    means, used = expert_mean_intensities(intensity, assignment)
    diff2 = (means[used].unsqueeze(0) - means[used].unsqueeze(1)) ** 2
    if share_weighted:
        share = assignment.sum(dim=0)[used] / len(assignment)
        diff2 = diff2 * share.unsqueeze(0) * share.unsqueeze(1)
    # Each unordered pair appears twice in the full matrix.
    return -0.5 * diff2.sum()


def expert_loss_signal(expert_losses: torch.Tensor, gates: torch.Tensor, baseline: bool = True) -> torch.Tensor:
    """How eq. 5.8's ``sum_i L(G_i, D_i)`` reaches a straight-through router.

    ``expert_losses`` ``(N,)`` are the experts' generator losses of the step (detached here;
    experts that sat the step out may hold any value, they have no routed samples) and
    ``gates`` ``(B, N)`` the straight-through one-hot assignments. The result is
    ``sum_i a_i * sum_b (y_bi - sg(y_bi)) / B``: its value is 0, so the objective's value is
    eq. 5.8 unchanged, and every sample routed to expert i gets the gradient ``a_i / B`` on
    its gate. With ``baseline`` ``a_i = L_i - L_bar``, ``L_bar`` the mean loss over the
    routed samples, so samples move from worse-than-average experts towards better ones;
    without it ``a_i = L_i``, which pushes every sample away from whichever expert it drew.
    """
    if gates.dim() != 2 or expert_losses.shape != gates.shape[1:]:
        raise ValueError(f"need expert_losses (N,) and gates (B, N), got {tuple(expert_losses.shape)} and {tuple(gates.shape)}")
    hard = gates.detach()
    losses = torch.where(hard.sum(0) > 0, expert_losses.detach(), torch.zeros_like(expert_losses))
    if baseline:
        losses = losses - (hard @ losses).mean()
    return ((gates - hard) * hard * losses).sum() / len(gates)


def router_terms(gates: torch.Tensor, probs: torch.Tensor, routed: list[torch.Tensor], active: list[int],
                 expert_losses: dict[int, torch.Tensor], intensity: torch.Tensor, real_intensity: torch.Tensor, *,
                 expert_loss_routing: str, diff_intensity_scale: float | None,
                 diff_share_weighted: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router's three terms of eq. 5.8 for one batch: (expert-loss signal, L_util, L_diff).

    ``routed[i]`` are the batch rows routed to expert i, ``active`` the experts that
    generated this step (their losses in ``expert_losses``, their generated photon sums in
    ``intensity``). The signal (``expert_loss_signal``, ``expert_loss_routing`` ``raw`` or
    ``baselined``, 0 for ``none``) and L_diff see only the rows of the active experts;
    L_util sees every row's gate probabilities ``probs``.
    """
    zero = gates.new_zeros(())
    in_step = torch.zeros(len(gates), dtype=torch.bool, device=gates.device)
    for i in active:
        in_step[routed[i]] = True
    signal = zero
    if active and expert_loss_routing != "none":
        losses = torch.stack([expert_losses.get(i, zero) for i in range(gates.shape[1])])
        signal = expert_loss_signal(losses, gates[in_step], expert_loss_routing == "baselined") * (in_step.sum() / len(gates))
    intensity = rescale_intensity(intensity, real_intensity, diff_intensity_scale)
    loss_diff = differentiation_loss(intensity[in_step], gates[in_step][:, active], diff_share_weighted) if active else zero
    return signal, utilisation_loss(probs), loss_diff
