"""The ExpertSim router: an MLP from the particle conditions to one expert per particle.

Discrete routing is made trainable with the straight-through Gumbel-softmax (Jang et al.
2017): during training the router draws ``y_soft = softmax((logits + g) / tau)`` with
Gumbel noise ``g`` and uses ``y = one_hot(argmax y_soft) - y_soft.detach() + y_soft``.
The forward value is an exact one-hot assignment (each particle goes to one expert), the
backward pass uses the gradient of ``y_soft``. The temperature ``tau`` is annealed
linearly from ``tau_start`` (about 1.2) to ``tau_end`` (about 0.8) over training; it shapes
the gradient only, since ``argmax((logits + g) / tau)`` does not depend on ``tau``.

The hard assignment is therefore a sample of ``softmax(logits)``. At inference rsgm routes
the same way by default (seeded Gumbel-max, ``Router.assign(sample=True)``): every expert
then receives the conditions it was trained on, and the expected share of each expert is
the batch-mean gate probability that the utilisation loss balances. The deterministic
``argmax(logits)`` routing is available too; it agrees once the router is confident.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    """MLP ``cond_dim -> hidden... -> n_experts`` logits with LeakyReLU(0.1) (reference
    code: 9 -> 128 -> 64 -> 32 -> N)."""

    def __init__(self, n_experts: int = 3, cond_dim: int = 9, hidden: tuple[int, ...] = (128, 64, 32),
                 negative_slope: float = 0.1) -> None:
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts must be at least 1, got {n_experts}")
        self.n_experts, self.cond_dim = n_experts, cond_dim
        layers: list[nn.Module] = []
        d = cond_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.LeakyReLU(negative_slope)]
            d = h
        self.net = nn.Sequential(*layers, nn.Linear(d, n_experts))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """Routing logits ``(B, n_experts)``."""
        return self.net(cond)

    def route(self, cond: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-time routing: (straight-through one-hot ``(B, N)``, gate probabilities
        ``softmax(logits)`` ``(B, N)`` for the utilisation loss)."""
        logits = self(cond)
        return F.gumbel_softmax(logits, tau=tau, hard=True), logits.softmax(dim=1)

    @torch.no_grad()
    def assign(self, cond: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None,
               uniforms: torch.Tensor | None = None) -> torch.Tensor:
        """Inference-time routing: the expert id ``(B,)`` of every condition.

        ``sample=True`` draws ``argmax(logits + Gumbel noise)``, i.e. a sample of
        ``softmax(logits)``: exactly the distribution of the hard training-time assignment
        (the temperature changes the gradient, never the argmax), so each expert is
        asked for the conditions it was trained on. ``sample=False`` takes ``argmax(logits)``.
        ``uniforms`` ``(B, N)`` in (0, 1), if given, replace the draws from ``generator``.
        """
        logits = self(cond)
        if sample:
            u = (torch.rand(logits.shape, generator=generator) if uniforms is None else uniforms).to(logits.device)
            logits = logits - torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
        return logits.argmax(dim=1)


def dispatch(generators: Sequence[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]], z: torch.Tensor,
             cond: torch.Tensor, expert_of: torch.Tensor) -> torch.Tensor:
    """Responses for ``(z, cond)`` routed to experts ``expert_of``: every expert generates
    its whole routed sub-batch in one call, and the same index tensor gathers its inputs
    and scatters its outputs back, so a condition is never paired with another expert's output."""
    if not len(z) == len(cond) == len(expert_of):
        raise ValueError(f"dispatch needs as many noise rows, conditions and expert ids, got {len(z)}, {len(cond)}, {len(expert_of)}")
    out: torch.Tensor | None = None
    for i, generate in enumerate(generators):
        idx = torch.nonzero(expert_of == i).squeeze(1)
        if len(idx) == 0:
            continue
        fake = generate(z[idx], cond[idx])
        if out is None:
            out = fake.new_zeros(len(cond), *fake.shape[1:])
        out[idx] = fake
    return out


def annealed_temperature(progress: float, tau_start: float = 1.2, tau_end: float = 0.8) -> float:
    """Linear schedule: ``tau_start`` at ``progress = 0``, ``tau_end`` from ``progress >= 1``."""
    p = min(max(progress, 0.0), 1.0)
    return tau_start + (tau_end - tau_start) * p
