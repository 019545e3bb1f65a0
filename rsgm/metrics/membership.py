"""Membership-inference metrics: exact ROC, TPR at a fixed FPR, and ROC-AUC.

Members are the positive class and a higher score means "more likely a member"
(methods_spec §0.1). Loss-like scores must be negated before they come here.

Every metric keeps per-sample "cat" states together with the sample index, so DDP gathers
all ranks' samples and duplicates added by ``DistributedSampler`` padding are dropped
before the exact ROC is built.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def deduplicate_by_index(index: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Keep the first row of each distinct ``index`` value, ordered by index.

    ``DistributedSampler`` pads the dataset to a multiple of the world size by repeating
    samples; exact metrics must count each sample once.
    """
    index = index.reshape(-1).long()
    unique, inverse = torch.unique(index, sorted=True, return_inverse=True)
    positions = torch.arange(index.numel(), device=index.device)
    first = torch.full((unique.numel(),), index.numel(), dtype=torch.long, device=index.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return (unique,) + tuple(t[first] for t in tensors)


def _check_scores(scores: Tensor, is_member: Tensor) -> tuple[Tensor, Tensor]:
    scores = torch.as_tensor(scores).reshape(-1).double()
    labels = torch.as_tensor(is_member).reshape(-1).bool()
    if scores.numel() != labels.numel():
        raise ValueError(f"scores has {scores.numel()} entries but is_member has {labels.numel()}; pass one label per score.")
    if torch.isnan(scores).any():
        raise ValueError("membership scores contain NaN; drop or fix those samples before computing the ROC.")
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.numel():
        raise ValueError(f"the ROC needs both members and non-members; got {n_pos} members out of {labels.numel()} samples.")
    return scores, labels


def membership_roc(scores: Tensor, is_member: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact ROC over every distinct score threshold (as ``sklearn.metrics.roc_curve`` with
    ``drop_intermediate=False``).

    A sample is predicted a member when ``score >= threshold``. Returns ``(fpr, tpr,
    thresholds)``, starting at the point (0, 0) with threshold ``+inf``.
    """
    scores, labels = _check_scores(scores, is_member)
    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order], labels[order].double()
    tp = torch.cumsum(y, 0)
    fp = torch.cumsum(1 - y, 0)
    # Tied scores form one operating point: keep the last position of each run of ties.
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    tp, fp, thr = tp[last], fp[last], s[last]
    zero = torch.zeros(1, dtype=torch.float64)
    tpr = torch.cat([zero, tp / y.sum()])
    fpr = torch.cat([zero, fp / (1 - y).sum()])
    thresholds = torch.cat([torch.full((1,), float("inf"), dtype=torch.float64), thr])
    return fpr, tpr, thresholds


def tpr_at_fpr(scores: Tensor, is_member: Tensor, fpr: float = 0.01) -> Tensor:
    """TPR@FPR=a: the largest TPR over exact ROC points with FPR <= a (never the nearest
    point above a, never a strict inequality)."""
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must lie in [0, 1], got {fpr}.")
    f, t, _ = membership_roc(scores, is_member)
    return t[f <= fpr + 1e-12].max()


def membership_auc(scores: Tensor, is_member: Tensor) -> Tensor:
    """ROC-AUC by the trapezoid rule over the exact ROC (ties count one half)."""
    f, t, _ = membership_roc(scores, is_member)
    return torch.trapezoid(t, f)


class _IndexedScores(Metric):
    """Cat states ``scores``, ``is_member`` and ``index``; subclasses reduce them."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("is_member", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, is_member: Tensor, index: Tensor) -> None:
        scores = torch.as_tensor(scores).reshape(-1)
        if not (scores.numel() == is_member.numel() == index.numel()):
            raise ValueError("scores, is_member and index must have one entry per sample.")
        self.scores.append(scores.detach().double())
        self.is_member.append(is_member.reshape(-1).long())
        self.index.append(index.reshape(-1).long())

    def _gathered(self) -> tuple[Tensor, Tensor]:
        _, s, y = deduplicate_by_index(dim_zero_cat(self.index), dim_zero_cat(self.scores), dim_zero_cat(self.is_member))
        return s, y


class TPRAtFPR(_IndexedScores):
    """Class twin of :func:`tpr_at_fpr`, gathered across DDP ranks and de-duplicated."""

    def __init__(self, fpr: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fpr = fpr

    def compute(self) -> Tensor:
        s, y = self._gathered()
        return tpr_at_fpr(s, y, self.fpr)


class MembershipAUC(_IndexedScores):
    """Class twin of :func:`membership_auc`, gathered across DDP ranks and de-duplicated."""

    def compute(self) -> Tensor:
        s, y = self._gathered()
        return membership_auc(s, y)


class MembershipFeatures(Metric):
    """Per-sample feature rows for a later attack: cat states ``features`` (N, k),
    ``is_member`` (ground truth), ``in_suspect`` (role: 1 in P, 0 in U) and ``index``.
    ``compute`` returns them gathered over ranks, de-duplicated and sorted by index."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("features", "is_member", "in_suspect", "index"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, features: Tensor, is_member: Tensor, index: Tensor, in_suspect: Tensor | None = None) -> None:
        if features.ndim != 2 or features.shape[0] != index.numel():
            raise ValueError(f"features must be (batch, k) with one row per index; got {tuple(features.shape)}.")
        self.features.append(features.detach().double())
        self.is_member.append(is_member.reshape(-1).long())
        self.in_suspect.append((is_member if in_suspect is None else in_suspect).reshape(-1).long())
        self.index.append(index.reshape(-1).long())

    def compute(self) -> dict[str, Tensor]:
        idx, f, y, r = deduplicate_by_index(dim_zero_cat(self.index), dim_zero_cat(self.features),
                                            dim_zero_cat(self.is_member), dim_zero_cat(self.in_suspect))
        return {"index": idx, "features": f, "is_member": y, "in_suspect": r}
