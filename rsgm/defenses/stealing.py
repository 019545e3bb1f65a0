"""Encoder stealing against a served encoder, and its evaluation (thesis §6.4, App. A.4).

Surrogate losses between the surrogate's outputs s_i and the API's answers t_i (batch of n):

* InfoNCE:  -1/n sum_i log softmax_j( cos(s_i, t_j) / tau )_i            (positives on the diagonal)
* MSE:      1/n sum_i ||s_i - t_i||^2 / d
* SoftNN:   soft nearest-neighbour loss (Frosst et al. 2019) on the 2n points {s_i} u {t_i}, where
            s_i and t_i share label i:  -1/2n sum_a log( sum_{b != a, y_b = y_a} e^{-|u_a-u_b|^2/T}
            / sum_{b != a} e^{-|u_a-u_b|^2/T} ), u the L2-normalised points.

Sybil remapping: the map from account B's answers to account A's is the least-squares affine fit
[t_B, 1] W = t_A on overlapping queries.  Fidelity is the mean cosine distance
1 - a.b / (|a| |b|) between remapped B answers and A answers on held-out queries.
Linear probes: multinomial logistic regression on standardised features (sklearn).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

LOSSES = ("infonce", "mse", "softnn")


def info_nce_loss(s: torch.Tensor, t: torch.Tensor, tau: float = 0.25) -> torch.Tensor:
    logits = F.normalize(s, dim=1) @ F.normalize(t, dim=1).T / tau
    return F.cross_entropy(logits, torch.arange(len(s), device=s.device))


def soft_nn_loss(s: torch.Tensor, t: torch.Tensor, temperature: float = 0.25) -> torch.Tensor:
    u = F.normalize(torch.cat([s, t]), dim=1)
    labels = torch.arange(len(s), device=s.device).repeat(2)
    d2 = torch.cdist(u, u).pow(2)
    eye = torch.eye(len(u), dtype=torch.bool, device=u.device)
    logits = (-d2 / temperature).masked_fill(eye, float("-inf"))
    same = (labels[:, None] == labels[None, :]) & ~eye
    log_num = torch.logsumexp(logits.masked_fill(~same, float("-inf")), dim=1)
    return -(log_num - torch.logsumexp(logits, dim=1)).mean()


def surrogate_loss(kind: str, s: torch.Tensor, t: torch.Tensor, tau: float = 0.25) -> torch.Tensor:
    if kind == "infonce":
        return info_nce_loss(s, t, tau)
    if kind == "mse":
        return F.mse_loss(s, t)
    if kind == "softnn":
        return soft_nn_loss(s, t, tau)
    raise ValueError(f"unknown stealing loss {kind!r}; use one of {LOSSES}")


def fit_linear_remap(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares W [d_src + 1, d_dst] with [src, 1] @ W ~ dst (min-norm when underdetermined)."""
    if len(src) != len(dst) or len(src) == 0:
        raise ValueError(f"remapping needs the same non-zero number of overlapping answers, got {len(src)} and {len(dst)}")
    a = torch.cat([src.double(), torch.ones(len(src), 1, dtype=torch.float64)], dim=1)
    return torch.linalg.lstsq(a, dst.double(), driver="gelsd").solution.float()


def apply_remap(w: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return src @ w[:-1] + w[-1]


def remap_sybils(answers: list[torch.Tensor], overlap: int, holdout: int = 0, grid=(), names: list[str] | None = None
                 ) -> tuple[torch.Tensor, list[dict]]:
    """Pool sybil accounts' answers in account 0's space (thesis §6.4, Fig. 6.4.3).

    ``answers[i]`` are account i's answers in query order; the first ``overlap`` queries are the
    same for every account.  Account i > 0 is mapped by the least-squares affine fit on all
    shared queries; the pooled targets are account 0's answers followed by each other account's
    remapped answers to its own (non-shared) queries.  For every n in ``grid`` with
    n <= overlap - holdout, a fit on the first n shared queries is scored on the last
    ``holdout`` shared ones (mean cosine distance): the remapping-fidelity curve.
    """
    if not answers:
        raise ValueError("remap_sybils needs at least one account's answers")
    if len(answers) > 1 and (overlap < 1 or holdout >= overlap or any(len(a) < overlap for a in answers)):
        raise ValueError(f"sybils need 0 <= holdout < overlap <= every account's query count; got overlap {overlap}, "
                         f"holdout {holdout}, counts {[len(a) for a in answers]}")
    names = names or [f"account-{i}" for i in range(len(answers))]
    ref, ys, fid = answers[0], [answers[0]], []
    for name, ans in zip(names[1:], answers[1:]):
        for n in [n for n in grid if n <= overlap - holdout]:
            w = fit_linear_remap(ans[:n], ref[:n])
            fid.append(dict(account=name, n_overlap=n, cosine_distance=mean_cosine_distance(
                apply_remap(w, ans[overlap - holdout:overlap]), ref[overlap - holdout:overlap])))
        ys.append(apply_remap(fit_linear_remap(ans[:overlap], ref[:overlap]), ans[overlap:]))
    return torch.cat(ys), fid


def mean_cosine_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((1 - F.cosine_similarity(a.double(), b.double(), dim=1)).mean())


def linear_probe_accuracy(f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor,
                          max_iter: int = 1000) -> float:
    """Test accuracy (%) of a logistic-regression probe trained on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    ftr, fte = f_train.double().numpy(), f_test.double().numpy()
    if not (np.isfinite(ftr).all() and np.isfinite(fte).all()):
        raise ValueError("linear probe features contain NaN or inf")
    scaler = StandardScaler().fit(ftr)
    clf = LogisticRegression(max_iter=max_iter).fit(scaler.transform(ftr), y_train.numpy())
    return 100.0 * float(clf.score(scaler.transform(fte), y_test.numpy()))


def as_batch(x) -> torch.Tensor:
    """A tensor from an image tensor slice or a lazy image sequence (``LazyImages``)."""
    return x if isinstance(x, torch.Tensor) else x[list(range(len(x)))]


def cat_images(parts: list):
    """Concatenate image tensors, or lazy image sequences without loading them."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    out = parts[0]
    for p in parts[1:]:
        out = out.cat(p)
    return out


def train_surrogate(surrogate: nn.Module, x, targets: torch.Tensor, loss: str = "infonce",
                    epochs: int = 10, batch_size: int = 256, lr: float = 1e-3, tau: float = 0.25, seed: int = 0,
                    desc: str = "steal", device: str | torch.device = "cpu") -> nn.Module:
    """Fit ``surrogate`` so that surrogate(x_i) matches the API answer targets_i (plain Adam loop).

    ``x`` is an image tensor or a lazy image sequence indexed by position tensors.
    """
    if len(x) != len(targets) or len(x) < 2:
        raise ValueError(f"stealing needs matching queries and answers (>= 2), got {len(x)} and {len(targets)}")
    if not torch.isfinite(targets).all():
        raise ValueError("API answers contain NaN or inf; lower the defence's sigma cap or check the encoder")
    g = torch.Generator().manual_seed(seed)
    surrogate.to(device)
    opt = torch.optim.Adam(surrogate.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * max(1, len(x) // batch_size))
    surrogate.train()
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - 1, batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2:
                continue
            opt.zero_grad()
            surrogate_loss(loss, surrogate(x[idx].to(device)), targets[idx].to(device), tau).backward()
            opt.step()
            sched.step()
    surrogate.eval()
    return surrogate


@torch.no_grad()
def embed(model: nn.Module, x, batch_size: int = 1024) -> torch.Tensor:
    """Representations of all images of ``x`` (tensor or lazy sequence), on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(as_batch(x[i:i + batch_size]).to(device)).cpu() for i in range(0, len(x), batch_size)])
