"""CaloChallenge-style fidelity of generated calorimeter responses, beside channel W1.

* **Classifier two-sample test** (:func:`classifier_auc`): a small network is trained to
  tell real from generated samples; its ROC AUC on held-out data is 0.5 when the two are
  indistinguishable and 1.0 when they are fully separable. This is the headline metric of
  the Fast Calorimeter Simulation Challenge 2022 (Krause et al., arXiv:2410.21611, §"Metrics":
  a classifier on low-level voxels and on high-level features, AUC on a held-out test set
  after early stopping on a validation set, with a calibration check).
* **FPD** (:func:`frechet_physics_distance`): the Fréchet distance between Gaussians fitted
  to the high-level features, measured at several sample sizes N and linearly extrapolated
  in 1/N to N = infinity (Kansal et al., "Evaluating generative models in high energy
  physics", arXiv:2211.10295, Phys. Rev. D 107, 076017; JetNet ``jetnet.evaluation.fpd``,
  which draws bootstrap batches of 1/linspace(1/min, 1/max) sizes and reports the intercept
  and its fit error). Features are divided by the real sample's per-feature max |x| first.
* **KPD** (:func:`kernel_physics_distance`): the unbiased quadratic-time MMD^2 with the
  polynomial kernel ``k(x, y) = (x.y / d + 1)^degree``, median over bootstrap batches and
  half the 16.275-83.725 % inter-quantile range as its error (same references; JetNet's
  ``kpd`` uses degree 4, KID (Binkowski et al., arXiv:1801.01401) the cubic kernel, so the
  degree is a parameter).

Each comes as a plain function (the functional twin) and as a torchmetrics ``Metric`` with
``cat`` states and per-sample dataset indices, so under DDP every rank's samples are
gathered and padded duplicates dropped before computing: the result equals the
single-process one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from rsgm.metrics.wasserstein import deduplicate
from rsgm.physics.channels import channel_values

HIGH_LEVEL_FEATURES = ("ch1", "ch2", "ch3", "ch4", "ch5", "photon_sum", "cog_x", "cog_y", "width_x", "width_y")


def high_level_features(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(N, 10)`` per-response features from photon-count images ``(N, [1,] H, W)``: the 5
    channel values, the photon sum, the centre of gravity (x = column, y = row, in pixels)
    and the shower width (photon-weighted standard deviation along x and y). An empty
    response has its centre at the image centre and width 0."""
    x = images.reshape(len(images), *images.shape[-2:]).double()
    h, w = x.shape[-2:]
    total = x.sum(dim=(1, 2))
    safe = total.clamp_min(1e-12)
    rows = torch.arange(h, dtype=torch.float64, device=x.device)
    cols = torch.arange(w, dtype=torch.float64, device=x.device)
    px, py = x.sum(1) / safe[:, None], x.sum(2) / safe[:, None]  # column and row profiles
    cx, cy = (px * cols).sum(1), (py * rows).sum(1)
    wx = ((px * (cols - cx[:, None]) ** 2).sum(1)).clamp_min(0).sqrt()
    wy = ((py * (rows - cy[:, None]) ** 2).sum(1)).clamp_min(0).sqrt()
    empty = total <= 0
    cx, cy = torch.where(empty, (w - 1) / 2, cx), torch.where(empty, (h - 1) / 2, cy)
    return torch.cat([channel_values(x, masks.to(x.device)).double(), torch.stack([total, cx, cy, wx, wy], 1)], 1)


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``, the squared 2-Wasserstein distance
    between two Gaussians. ``tr (S1 S2)^(1/2)`` is the sum of the square roots of the
    eigenvalues of the symmetric ``S1^(1/2) S2 S1^(1/2)`` (same spectrum as ``S1 S2``)."""
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    vals, vecs = torch.linalg.eigh(sigma1)
    root1 = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    middle = root1 @ sigma2 @ root1
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_sqrt


def _normalise(real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both samples divided by the real sample's per-feature max |x| (JetNet convention)."""
    scale = real.abs().amax(0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return real / scale, fake / scale


def frechet_physics_distance(real: torch.Tensor, fake: torch.Tensor, min_samples: int | None = None,
                             max_samples: int | None = None, num_batches: int = 20, num_points: int = 10,
                             normalise: bool = True, seed: int = 42) -> tuple[float, float]:
    """FPD and its error: the mean Fréchet distance of ``num_batches`` bootstrap batches
    (drawn with replacement) at ``num_points`` batch sizes evenly spaced in 1/N between
    ``min_samples`` and ``max_samples``, fitted by ``a + b / N`` with a, b >= 0; returns
    ``(a, standard error of a)``. The intercept removes the bias of the batch size; two
    finite samples of one distribution still differ by about ``2 d / N`` in the normalised
    mean term alone (``d`` features, ``N`` rows each). Defaults: ``max_samples`` = the smaller sample size
    (at most 50,000, JetNet's value), ``min_samples`` = 2/5 of it (JetNet: 20,000 of 50,000)."""
    from scipy.optimize import curve_fit

    real, fake = real.double(), fake.double()
    if normalise:
        real, fake = _normalise(real, fake)
    max_samples = max_samples or min(50_000, len(real), len(fake))
    min_samples = min_samples or max(2, int(0.4 * max_samples))
    if min_samples < 2 or max_samples < min_samples:
        raise ValueError(f"need 2 <= min_samples <= max_samples, got {min_samples}, {max_samples}")
    sizes = (1.0 / np.linspace(1.0 / min_samples, 1.0 / max_samples, num_points)).astype(np.int64)
    gen = torch.Generator().manual_seed(seed)
    means = []
    for n in sizes:
        values = []
        for _ in range(num_batches):
            a = real[torch.randint(len(real), (int(n),), generator=gen)]
            b = fake[torch.randint(len(fake), (int(n),), generator=gen)]
            values.append(float(frechet_distance(a.mean(0), torch.cov(a.T).reshape(a.shape[1], -1),
                                                 b.mean(0), torch.cov(b.T).reshape(b.shape[1], -1))))
        means.append(np.mean(values))
    params, cov = curve_fit(lambda x, a, b: a + b * x, 1.0 / sizes, np.asarray(means), bounds=([0, 0], [np.inf, np.inf]))
    return float(params[0]), float(np.sqrt(cov[0, 0]))


def polynomial_mmd2(x: torch.Tensor, y: torch.Tensor, degree: int = 4) -> torch.Tensor:
    """Unbiased MMD^2 with ``k(a, b) = (a.b / d + 1)^degree``: the means of k over distinct
    pairs within x and within y minus twice the mean over all x-y pairs."""
    x, y = x.double(), y.double()
    d = x.shape[1]
    kxx, kyy, kxy = ((p @ q.T / d + 1) ** degree for p, q in ((x, x), (y, y), (x, y)))
    m, n = len(x), len(y)
    return ((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
            - 2 * kxy.mean())


def kernel_physics_distance(real: torch.Tensor, fake: torch.Tensor, num_batches: int = 10, batch_size: int = 5000,
                            degree: int = 4, normalise: bool = True, seed: int = 42) -> tuple[float, float]:
    """KPD and its error: the median of :func:`polynomial_mmd2` over ``num_batches``
    bootstrap batches of ``batch_size`` (capped at the smaller sample), and half the
    16.275-83.725 % inter-quantile range of the batch values."""
    real, fake = real.double(), fake.double()
    if normalise:
        real, fake = _normalise(real, fake)
    n = min(batch_size, len(real), len(fake))
    if n < 2:
        raise ValueError("kernel_physics_distance needs at least 2 samples on each side")
    gen = torch.Generator().manual_seed(seed)
    values = torch.stack([polynomial_mmd2(real[torch.randint(len(real), (n,), generator=gen)],
                                          fake[torch.randint(len(fake), (n,), generator=gen)], degree)
                          for _ in range(num_batches)])
    lo, hi = torch.quantile(values, torch.tensor([0.16275, 0.83725], dtype=torch.float64))
    return float(values.median()), float((hi - lo) / 2)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def expected_calibration_error(prob: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width probability bins, weighted by count."""
    which = np.minimum((prob * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        rows = which == b
        if rows.any():
            ece += rows.mean() * abs(labels[rows].mean() - prob[rows].mean())
    return float(ece)


def condition_ids(cond: torch.Tensor) -> torch.Tensor:
    """One int64 id per distinct condition row (a hash of the float32 bits)."""
    bits = cond.float().contiguous().view(torch.int32).long() & 0xFFFFFFFF
    ids = torch.zeros(len(cond), dtype=torch.int64, device=cond.device)
    for k in range(bits.shape[1]):
        ids = (ids * 1_000_003 + bits[:, k]) & (2 ** 62 - 1)
    return ids


def classifier_auc(real: torch.Tensor, fake: torch.Tensor, max_samples: int = 5000, hidden: int = 128,
                   epochs: int = 30, patience: int = 5, lr: float = 1e-3, batch_size: int = 256,
                   split: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0,
                   groups: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
    """Classifier two-sample test between real and generated feature rows ``(N, d)``.

    Up to ``max_samples`` rows per side (a seeded random subset) are split into train /
    validation / test in the ``split`` proportions. ``groups`` (an id per real and per
    generated row, e.g. :func:`condition_ids` of the conditions) keeps every group in one
    part: ZDC data repeat each particle several times, and siblings of one particle in
    both the training and the test rows let the classifier recognise the sample it saw
    (real vs real from the simulator gave AUC 0.57 ± 0.02 with a row split). Rows are
    standardised with the training rows' statistics and fed to an MLP (``d -> hidden -> hidden -> 1``, LeakyReLU, dropout 0.1)
    trained with binary cross-entropy and Adam. Training stops when the validation loss has
    not improved for ``patience`` epochs; the weights of the best validation epoch are kept.

    Returns ``auc`` on the test rows, ``auc_err`` (the Hanley-McNeil standard error),
    ``auc_val``, the test-set ``brier`` score and expected calibration error ``ece`` of the
    predicted probabilities, ``epochs`` trained and the counts ``n_train`` / ``n_test``.
    """
    # Metrics are computed inside Lightning's test loop, which runs in inference mode.
    with torch.inference_mode(False), torch.enable_grad():
        return _classifier_auc(real.clone(), fake.clone(), max_samples, hidden, epochs, patience, lr, batch_size,
                               split, seed, groups)


def _split_rows(group: torch.Tensor, split: tuple[float, float, float], gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Train / validation / test row indices; whole groups go to one part, in a seeded order."""
    unique, inverse = torch.unique(group, return_inverse=True)
    rank = torch.empty(len(unique), dtype=torch.long)
    rank[torch.randperm(len(unique), generator=gen)] = torch.arange(len(unique))
    order = torch.argsort(rank[inverse] * len(group) + torch.randperm(len(group), generator=gen))
    # Cut where the cumulative share of rows passes each boundary, at group borders.
    g = rank[inverse][order]
    border = torch.ones(len(g), dtype=torch.bool)
    border[1:] = g[1:] != g[:-1]
    cuts = []
    for share in (split[0], split[0] + split[1]):
        pos = torch.nonzero(border & (torch.arange(len(g)) >= int(round(share * len(g))))).flatten()
        cuts.append(int(pos[0]) if len(pos) else len(g))
    return order[:cuts[0]], order[cuts[0]:cuts[1]], order[cuts[1]:]


def _classifier_auc(real: torch.Tensor, fake: torch.Tensor, max_samples: int, hidden: int, epochs: int, patience: int,
                    lr: float, batch_size: int, split: tuple[float, float, float], seed: int,
                    groups: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    keep_r = torch.randperm(len(real), generator=gen)[:max_samples]
    keep_f = torch.randperm(len(fake), generator=gen)[:max_samples]
    x = torch.cat([real.float()[keep_r], fake.float()[keep_f]])
    y = torch.cat([torch.ones(len(keep_r)), torch.zeros(len(keep_f))])
    if groups is None:
        group = torch.arange(len(x))
    else:
        group = torch.cat([groups[0].cpu()[keep_r], groups[1].cpu()[keep_f]])
    parts = _split_rows(group, split, gen)
    if min(len(p) for p in parts) < 2:
        raise ValueError(f"classifier_auc needs more samples or groups: {len(keep_r)} real and {len(keep_f)} "
                         f"generated rows in {len(torch.unique(group))} groups")
    n_train = len(parts[0])
    mean, std = x[parts[0]].mean(0), x[parts[0]].std(0).clamp_min(1e-6)
    (xtr, xva, xte), (ytr, yva, yte) = [((x[p] - mean) / std) for p in parts], [y[p] for p in parts]

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.LeakyReLU(0.2), nn.Dropout(0.1),
                            nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Dropout(0.1), nn.Linear(hidden, 1))
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        loss_fn = nn.BCEWithLogitsLoss()
        best, best_state, bad, trained = math.inf, None, 0, 0
        for _ in range(epochs):
            net.train()
            for rows in torch.randperm(len(xtr), generator=gen).split(batch_size):
                opt.zero_grad()
                loss_fn(net(xtr[rows]).squeeze(1), ytr[rows]).backward()
                opt.step()
            trained += 1
            net.eval()
            with torch.no_grad():
                val = float(loss_fn(net(xva).squeeze(1), yva))
            if val < best - 1e-4:
                best, best_state, bad = val, {k: v.clone() for k, v in net.state_dict().items()}, 0
            else:
                bad += 1
                if bad >= patience:
                    break
        net.load_state_dict(best_state)
        net.eval()
        with torch.no_grad():
            p_val = torch.sigmoid(net(xva).squeeze(1)).double().numpy()
            p_test = torch.sigmoid(net(xte).squeeze(1)).double().numpy()
    labels = yte.numpy()
    auc = _auc(p_test, labels)
    n1, n0 = labels.sum(), len(labels) - labels.sum()
    q1, q2 = auc / (2 - auc), 2 * auc ** 2 / (1 + auc)
    auc_err = math.sqrt(max(auc * (1 - auc) + (n1 - 1) * (q1 - auc ** 2) + (n0 - 1) * (q2 - auc ** 2), 0.0) / (n1 * n0))
    return {"auc": auc, "auc_err": auc_err, "auc_val": _auc(p_val, yva.numpy()),
            "brier": float(np.mean((p_test - labels) ** 2)), "ece": expected_calibration_error(p_test, labels),
            "epochs": float(trained), "n_train": float(n_train), "n_test": float(len(labels))}


class _PairedSamples(Metric):
    """``cat`` states ``real``, ``fake`` (one row per sample) and ``index``; ``samples()``
    returns them gathered and de-duplicated by index, in index order."""

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("real", "fake", "index", "group"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, real: torch.Tensor, fake: torch.Tensor, index: torch.Tensor, group: torch.Tensor | None = None) -> None:
        """Rows ``real[i]`` and ``fake[i]`` share the condition of sample ``index[i]``;
        ``group`` (default: the index) is its condition id (see :func:`condition_ids`)."""
        if real.shape != fake.shape or len(index) != len(real):
            raise ValueError(f"real {tuple(real.shape)}, generated {tuple(fake.shape)} and {len(index)} indices do not match")
        self.real.append(real.flatten(1))
        self.fake.append(fake.flatten(1))
        self.index.append(index.long())
        self.group.append(index.long() if group is None else group.long())

    def samples(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(real rows, generated rows, group ids), gathered, de-duplicated, in index order."""
        _, real, fake, group = deduplicate(dim_zero_cat(self.index), dim_zero_cat(self.real), dim_zero_cat(self.fake),
                                           dim_zero_cat(self.group))
        return real.cpu(), fake.cpu(), group.cpu()


class ClassifierAUC(_PairedSamples):
    """:func:`classifier_auc` on the gathered feature rows; ``kwargs`` of that function go
    in ``classifier``. ``compute()`` returns its dict of floats."""

    higher_is_better = False

    def __init__(self, classifier: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.classifier = dict(classifier or {})

    def compute(self) -> dict[str, float]:
        real, fake, group = self.samples()
        # A real row and the generated row for its condition share a group, so a condition's
        # rows never straddle the classifier's train and test parts.
        return classifier_auc(real, fake, groups=(group, group), **self.classifier)


class PhysicsDistances(_PairedSamples):
    """FPD and KPD (with errors) on the gathered feature rows; ``fpd`` / ``kpd`` hold the
    keyword arguments of :func:`frechet_physics_distance` / :func:`kernel_physics_distance`.
    ``compute()`` returns ``fpd``, ``fpd_err``, ``kpd``, ``kpd_err``."""

    higher_is_better = False

    def __init__(self, fpd: dict[str, Any] | None = None, kpd: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fpd_args, self.kpd_args = dict(fpd or {}), dict(kpd or {})

    def compute(self) -> dict[str, float]:
        real, fake, _ = self.samples()
        fpd, fpd_err = frechet_physics_distance(real, fake, **self.fpd_args)
        kpd, kpd_err = kernel_physics_distance(real, fake, **self.kpd_args)
        return {"fpd": fpd, "fpd_err": fpd_err, "kpd": kpd, "kpd_err": kpd_err}
