"""The experts of a mixture (ExpertSim): independent conditional GANs built from one template."""

from __future__ import annotations

import copy

from torch import nn

from rsgm.lightning_modules.sdi_gan import ConditionalGAN


def fresh_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every layer re-initialised: same architecture, no
    shared tensors, independent initial weights."""
    clone = copy.deepcopy(module)
    for layer in clone.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    return clone


def build_experts(n_experts: int, generator: nn.Module, discriminator: nn.Module, aux_regressor: nn.Module | None,
                  **objective) -> nn.ModuleList:
    """``n_experts`` independent ConditionalGANs sharing only their hyperparameters.

    Kept outside ``ExpertSim.__init__`` so each expert's ``save_hyperparameters`` records
    its own arguments only.
    """
    return nn.ModuleList(
        ConditionalGAN(fresh_copy(generator), fresh_copy(discriminator),
                       None if aux_regressor is None else fresh_copy(aux_regressor), **objective)
        for _ in range(n_experts)
    )
