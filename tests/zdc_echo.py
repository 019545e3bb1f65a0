"""A deterministic stand-in generator for the prediction-writer tests: every pixel of its
log1p-space output is |first standardised condition| (the energy), so a written response
can be matched to its condition exactly; ``noise_scale`` adds the first noise value."""

import torch
from torch import nn

from rsgm.physics.simulator import IMAGE_SHAPES


class EchoGenerator(nn.Module):
    def __init__(self, detector: str = "neutron", noise_dim: int = 10, cond_dim: int = 9, noise_scale: float = 0.0) -> None:
        super().__init__()
        self.noise_dim, self.cond_dim, self.image_shape = noise_dim, cond_dim, IMAGE_SHAPES[detector]
        self.noise_scale = noise_scale
        self.unused = nn.Linear(1, 1)  # an optimiser needs a parameter

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        value = cond[:, 0].abs() + self.noise_scale * z[:, 0].abs()
        return value.view(-1, 1, 1, 1).expand(-1, 1, *self.image_shape).clone()
