"""The Monte-Carlo reference of thesis Table 5.4.2: two independent simulator runs compared
with each other by the models' metric, the mean channel W1 (the best W1 any model can reach
on that data, since a perfect model is one more independent run)."""

from __future__ import annotations

import numpy as np
import torch

from rsgm.metrics.wasserstein import ChannelWasserstein
from rsgm.physics.simulator import IMAGE_SHAPES, resimulate_zdc


def monte_carlo_w1(images: torch.Tensor | np.ndarray, conditions: np.ndarray, detector: str = "neutron",
                   seed: int = 0) -> dict[str, object]:
    """Channel W1 between ``images`` (photon counts ``(N, H, W)``, one response per row of
    ``conditions``, the raw 9 condition columns) and a re-simulation of the same conditions
    with the built-in simulator under ``seed``, computed by
    :class:`~rsgm.metrics.wasserstein.ChannelWasserstein` exactly as for a model's responses
    (pairs by row; quartiles of the first run's photon sums). Returns ``w1_mean``,
    ``w1`` (5 channels) and ``w1_quartiles`` (4) as floats / lists."""
    real = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if real.dim() != 3 or len(real) != len(conditions):
        raise ValueError(f"need images (N, H, W) and N conditions, got {tuple(real.shape)} and {len(conditions)}")
    second = torch.from_numpy(resimulate_zdc(conditions, detector, seed=seed))
    metric = ChannelWasserstein(IMAGE_SHAPES[detector])
    metric.update(real, second, torch.arange(len(real)))
    out = metric.compute()
    return {"w1_mean": float(out["w1_mean"]), "w1": out["w1"].tolist(), "w1_quartiles": out["w1_quartiles"].tolist()}
