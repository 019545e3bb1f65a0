"""A torchmetrics container that gathers per-sample tensors across DDP ranks."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from rsgm.metrics.wasserstein import deduplicate


class GatheredSamples(Metric):
    """Collects named per-sample tensors (``cat`` states) plus each sample's dataset index;
    ``compute()`` returns them gathered from all ranks with padded duplicates removed."""

    full_state_update = False

    def __init__(self, names: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.names = list(names)
        for name in [*self.names, "index"]:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, index: torch.Tensor, **tensors: torch.Tensor) -> None:
        if sorted(tensors) != sorted(self.names):
            raise ValueError(f"expected tensors {sorted(self.names)}, got {sorted(tensors)}")
        for name, value in tensors.items():
            if len(value) != len(index):
                raise ValueError(f"{name} has {len(value)} rows for {len(index)} indices")
            getattr(self, name).append(value)
        self.index.append(index.long())

    def compute(self) -> dict[str, torch.Tensor]:
        index, *values = deduplicate(dim_zero_cat(self.index), *(dim_zero_cat(getattr(self, n)) for n in self.names))
        return {"index": index, **dict(zip(self.names, values))}
