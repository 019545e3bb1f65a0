"""Fine-label digits for the IAR CFG-difference experiment (docs/iar.md, "fine-label testbed").

With 10 digit classes the class is almost fixed by an 8x8 image, so ``log p(c|x) - log p(c)``
(what the CFG difference measures) carries little image-specific information. Here each
digit class is split into ``clusters_per_class`` k-means clusters of its pixels, so the label
(``digit * clusters_per_class + cluster``) tells the model which *kind* of that digit it is,
detail the null (unconditional) pass cannot predict, as ImageNet's 1000 classes do for the
thesis' models. The clusters are fitted once on all 1797 digits (members and non-members
alike, so the label is no membership oracle) with a fixed seed, and are deterministic.

:class:`FineDigitsData` trains on them (same member split as :class:`DigitsDiffusionData`);
:class:`FineDigitsMembership` audits with the same labels.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from rsgm.datamodules.membership import DigitsDiffusionData, DigitsMembership, digits_images


def fine_digit_labels(x: torch.Tensor, y: torch.Tensor, clusters_per_class: int, seed: int = 0) -> torch.Tensor:
    """Label ``y * clusters_per_class + k`` where ``k`` is the image's k-means cluster (on the
    flattened pixels, fitted within its digit class); clusters numbered by decreasing size
    (ties: lower k-means index), so the labelling does not depend on k-means' arbitrary order."""
    from sklearn.cluster import KMeans

    if clusters_per_class < 1:
        raise ValueError(f"clusters_per_class must be >= 1, got {clusters_per_class}.")
    flat, out = x.flatten(1).double().numpy(), torch.empty_like(y)
    for c in torch.unique(y).tolist():
        rows = torch.nonzero(y == c).flatten()
        if len(rows) < clusters_per_class:
            raise ValueError(f"digit class {c} has {len(rows)} images, fewer than clusters_per_class = {clusters_per_class}.")
        km = KMeans(clusters_per_class, n_init=10, random_state=seed).fit(flat[rows.numpy()])
        sizes = np.bincount(km.labels_, minlength=clusters_per_class)
        rank = np.empty(clusters_per_class, dtype=np.int64)
        rank[np.lexsort((np.arange(clusters_per_class), -sizes))] = np.arange(clusters_per_class)
        out[rows] = torch.from_numpy(c * clusters_per_class + rank[km.labels_])
    return out


def all_fine_labels(clusters_per_class: int, seed: int = 0) -> torch.Tensor:
    """Fine labels of all 1797 digits (clusters on the original 8x8 pixels), computed once per process."""
    return _all_fine_labels(clusters_per_class, seed).clone()


@lru_cache(maxsize=4)
def _all_fine_labels(clusters_per_class: int, seed: int) -> torch.Tensor:
    x, y = digits_images(8)
    return fine_digit_labels(x, y, clusters_per_class, seed)


class FineDigitsData(DigitsDiffusionData):
    """:class:`DigitsDiffusionData` with the fine labels (``10 * clusters_per_class`` classes)."""

    def __init__(self, clusters_per_class: int = 8, cluster_seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clusters_per_class, self.cluster_seed = clusters_per_class, cluster_seed

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        labels = all_fine_labels(self.clusters_per_class, seed=self.cluster_seed)
        self.train_set.y = labels[torch.tensor(self.split["members"])]


class FineDigitsMembership(DigitsMembership):
    """:class:`DigitsMembership` with the fine labels of :class:`FineDigitsData`."""

    def __init__(self, clusters_per_class: int = 8, cluster_seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clusters_per_class, self.cluster_seed = clusters_per_class, cluster_seed

    def pools(self):
        pools = super().pools()
        self._y = all_fine_labels(self.clusters_per_class, seed=self.cluster_seed)
        return pools
