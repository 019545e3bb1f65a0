"""Dataset-inference statistics (CDI, methods_spec §0.2 and §5.2, §5.6).

Roles: P is the suspect (published) set, U the known non-member reference set. Every
sample carries a feature row; a scoring model turns rows into membership scores (higher
means member) and a one-sided Welch t-test asks whether P scores higher than U.

The expensive part is resampling: 1000 random (P, U) subsets per |P|, each with 5-fold
cross-fitting, i.e. 5000 logistic regressions per |P|. :func:`batched_cdi` solves all of
them together in torch (Newton's method on the exact sklearn objective), so a whole grid
runs in seconds; :func:`loop_cdi` is the straightforward sklearn loop it is tested against.

Everything here is model-agnostic: it takes feature matrices, whatever produced them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats as sps
from torch import Tensor
from tqdm.auto import tqdm


# --------------------------------------------------------------------------- tests


def welch_t_test(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One-sided Welch test of H1: mean(a) > mean(b), batched over leading dimensions.

    t = (mean_a - mean_b) / sqrt(v_a + v_b), v_x = var_x / n_x (unbiased variances);
    df = (v_a + v_b)^2 / (v_a^2/(n_a-1) + v_b^2/(n_b-1));  p = 1 - F_t(t; df).
    Same as ``scipy.stats.ttest_ind(a, b, equal_var=False, alternative="greater")`` along the
    last dimension. Returns ``(t, df, p)``.
    """
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    na, nb = a.shape[-1], b.shape[-1]
    if na < 2 or nb < 2:
        raise ValueError(f"the Welch test needs at least 2 samples per group, got {na} and {nb}.")
    va = a.var(-1, unbiased=True) / na
    vb = b.var(-1, unbiased=True) / nb
    t = (a.mean(-1) - b.mean(-1)) / torch.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    p = torch.from_numpy(np.asarray(sps.t.sf(t.numpy(), df.numpy()), dtype=np.float64))
    return t, df, p


def cohen_d(a: Tensor, b: Tensor) -> Tensor:
    """Cohen's d = (mean_a - mean_b) / s_pooled with
    s_pooled = sqrt(((n_a-1) s_a^2 + (n_b-1) s_b^2) / (n_a + n_b - 2)), batched over leading dims."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    na, nb = a.shape[-1], b.shape[-1]
    pooled = ((na - 1) * a.var(-1) + (nb - 1) * b.var(-1)) / (na + nb - 2)
    return (a.mean(-1) - b.mean(-1)) / torch.sqrt(pooled)


def ttest_power(d: Tensor | float, n1: int, n2: int, alpha: float = 0.01) -> Tensor:
    """Power of the one-sided two-sample t-test at level ``alpha`` for effect size ``d``
    (App. C.17: the power at alpha = 0.01 is the test's TPR@FPR=1 %).

    power = 1 - F_{nct}(t_{1-alpha, df}; df, nc), df = n1 + n2 - 2,
    nc = d * sqrt(n1 n2 / (n1 + n2)); the same as statsmodels'
    ``TTestIndPower().power(d, n1, ratio=n2/n1, alpha, alternative="larger")``.
    """
    df = n1 + n2 - 2
    nc = np.asarray(torch.as_tensor(d, dtype=torch.float64)) * math.sqrt(n1 * n2 / (n1 + n2))
    crit = sps.t.isf(alpha, df)
    return torch.as_tensor(sps.nct.sf(crit, df, nc), dtype=torch.float64)


# --------------------------------------------------------------------------- scoring model


def sklearn_fit_score(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, C: float = 1.0, tol: float = 1e-4) -> np.ndarray:
    """StandardScaler + logistic regression; returns the logit (decision function) of X_test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, tol=tol, max_iter=10_000))
    model.fit(X_train, y_train)
    return model.decision_function(X_test)


def kfold_assignment(n: int, k: int, generator: torch.Generator) -> Tensor:
    """Random fold id per sample with fold sizes differing by at most one (as shuffled KFold)."""
    if n < k:
        raise ValueError(f"{k}-fold cross-fitting needs at least {k} samples per set, got {n}.")
    return torch.randperm(n, generator=generator) % k


def cross_fit_scores(FP, FU, k: int = 5, seed: int = 0, fit_score=sklearn_fit_score) -> tuple[np.ndarray, np.ndarray]:
    """k-fold cross-fitting over P and U (§5.2 step 2): P and U are each split into k folds;
    fold j of both is scored by a model fitted on the other k-1 folds (labels 1 for P, 0 for U),
    so every sample is scored exactly once by a model that never saw it.

    ``fit_score(X_train, y_train, X_test) -> scores`` is the scoring model.
    """
    FP, FU = np.asarray(FP, dtype=np.float64), np.asarray(FU, dtype=np.float64)
    g = torch.Generator().manual_seed(seed)
    fold_p, fold_u = kfold_assignment(len(FP), k, g).numpy(), kfold_assignment(len(FU), k, g).numpy()
    sP, sU = np.empty(len(FP)), np.empty(len(FU))
    for j in range(k):
        trp, tru = fold_p != j, fold_u != j
        X = np.concatenate([FP[trp], FU[tru]])
        y = np.r_[np.ones(trp.sum()), np.zeros(tru.sum())]
        scores = fit_score(X, y, np.concatenate([FP[~trp], FU[~tru]]))
        sP[~trp], sU[~tru] = scores[: (~trp).sum()], scores[(~trp).sum():]
    return sP, sU


def batched_logistic_regression(X: Tensor, y: Tensor, w: Tensor, C: float = 1.0, max_iter: int = 100, tol: float = 1e-10):
    """Many StandardScaler + L2 logistic regressions at once, each on a weighted subset.

    For every batch element b, with training weights w_b in {0, 1}: standardise with the
    weighted mean and population std of the training rows (std 0 -> 1, as StandardScaler),
    then minimise  0.5 ||beta||^2 + C * sum_i w_bi * log(1 + exp(-(2 y_i - 1)(x_i beta + b0)))
    (the sklearn objective, intercept unpenalised) by damped Newton steps.

    X: (B, n, d), y: (n,) or (B, n), w: (B, n). Returns ``(beta, intercept, mean, scale)``.
    """
    X, w = X.double(), w.double()
    y = torch.broadcast_to(y.double(), w.shape)
    wsum = w.sum(-1, keepdim=True)
    mean = (w.unsqueeze(-1) * X).sum(1) / wsum
    var = (w.unsqueeze(-1) * (X - mean.unsqueeze(1)) ** 2).sum(1) / wsum
    scale = torch.sqrt(var)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    A = torch.cat([(X - mean.unsqueeze(1)) / scale.unsqueeze(1), torch.ones_like(X[..., :1])], -1)
    B, n, d1 = A.shape
    dev = X.device
    reg = torch.ones(d1, dtype=torch.float64, device=dev)
    reg[-1] = 0.0
    theta = torch.zeros(B, d1, dtype=torch.float64, device=dev)
    sign = 2 * y - 1
    halvings = 0.5 ** torch.arange(8, dtype=torch.float64, device=dev)
    active = torch.arange(B, device=dev)  # models not yet converged; converged ones drop out of the batch

    for _ in range(max_iter):
        if active.numel() == B:  # no copies while every model is still iterating
            Aa, wa, ya, sa, th = A, w, y, sign, theta.clone()
        else:
            Aa, wa, ya, sa, th = A[active], w[active], y[active], sign[active], theta[active]
        z = torch.bmm(Aa, th.unsqueeze(-1)).squeeze(-1)
        p = torch.sigmoid(z)
        grad = C * torch.bmm(Aa.transpose(1, 2), (wa * (p - ya)).unsqueeze(-1)).squeeze(-1) + reg * th
        hess = C * torch.bmm(Aa.transpose(1, 2) * (wa * p * (1 - p)).unsqueeze(1), Aa) + torch.diag(reg)
        step = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
        # Backtracking: take the longest of 1, 1/2, 1/4, ... that does not increase the
        # objective (plain Newton can overshoot far from the optimum).
        cand = th.unsqueeze(0) - halvings.view(-1, 1, 1) * step.unsqueeze(0)  # (L, Ba, d1)
        zc = torch.bmm(Aa, cand.permute(1, 2, 0)).permute(2, 0, 1)
        obj = 0.5 * (reg * cand**2).sum(-1) + C * (wa * torch.nn.functional.softplus(-sa * zc)).sum(-1)
        obj0 = 0.5 * (reg * th**2).sum(-1) + C * (wa * torch.nn.functional.softplus(-sa * z)).sum(-1)
        ok = obj <= obj0 + 1e-12 * obj0.abs()
        first = torch.where(ok.any(0), ok.float().argmax(0), torch.full_like(obj0, len(halvings) - 1, dtype=torch.long))
        moved = halvings[first].unsqueeze(-1) * step
        theta[active] = th - moved
        active = active[moved.abs().amax(-1) >= tol]
        if active.numel() == 0:
            break
    return theta[:, :-1], theta[:, -1], mean, scale


# --------------------------------------------------------------------------- resampling


@dataclass
class TrialDraw:
    """Row indices into ``cat([members, non_members])`` for each trial, and fold ids.

    idx_p: (T, n_p), idx_u: (T, n_u), fold_p: (T, n_p), fold_u: (T, n_u)."""

    idx_p: Tensor
    idx_u: Tensor
    fold_p: Tensor
    fold_u: Tensor


def draw_trials(n_members: int, n_nonmembers: int, n_p: int, n_u: int, trials: int, k: int = 5,
                contamination: float = 0.0, seed: int = 0) -> TrialDraw:
    """Random suspect/reference subsets for ``trials`` independent data-owner cases.

    P holds ``round(contamination * n_p)`` non-members and the rest members; U holds ``n_u``
    non-members, disjoint from the non-members in P. ``contamination=1`` is the null
    experiment (P and U both non-members). Fold ids are balanced per set, as shuffled KFold.
    """
    n_bad = int(round(contamination * n_p))
    n_good = n_p - n_bad
    if n_good > n_members:
        raise ValueError(f"|P| = {n_p} with contamination {contamination} needs {n_good} members, but only {n_members} are available.")
    if n_bad + n_u > n_nonmembers:
        raise ValueError(f"|U| = {n_u} plus {n_bad} non-members in P needs {n_bad + n_u} non-members, but only {n_nonmembers} are available.")
    g = torch.Generator().manual_seed(seed)
    mem = torch.rand(trials, n_members, generator=g).argsort(-1)[:, :n_good]
    non = torch.rand(trials, n_nonmembers, generator=g).argsort(-1)[:, : n_bad + n_u] + n_members
    idx_p = torch.cat([mem, non[:, :n_bad]], 1)
    idx_u = non[:, n_bad:]
    fold_p = torch.rand(trials, n_p, generator=g).argsort(-1) % k
    fold_u = torch.rand(trials, n_u, generator=g).argsort(-1) % k
    return TrialDraw(idx_p, idx_u, fold_p, fold_u)


def _cross_fit_batch(F: Tensor, idx_p: Tensor, idx_u: Tensor, fold_p: Tensor, fold_u: Tensor, k: int, C: float) -> tuple[Tensor, Tensor]:
    T, n_p = idx_p.shape
    X = F[torch.cat([idx_p, idx_u], 1)]  # (T, n, d)
    fold = torch.cat([fold_p, fold_u], 1)
    y = torch.cat([torch.ones(n_p), torch.zeros(idx_u.shape[1])]).double().to(F.device)
    n, d = X.shape[1:]
    w = (fold.unsqueeze(1) != torch.arange(k, device=F.device).view(1, k, 1)).double()  # (T, k, n)
    Xk = X.unsqueeze(1).expand(T, k, n, d).reshape(T * k, n, d)
    beta, b0, mean, scale = batched_logistic_regression(Xk, y, w.reshape(T * k, n), C=C)
    z = torch.einsum("bnd,bd->bn", (Xk - mean.unsqueeze(1)) / scale.unsqueeze(1), beta) + b0.unsqueeze(-1)
    scores = z.view(T, k, n).gather(1, fold.unsqueeze(1)).squeeze(1)  # each sample scored by the model of its own (held-out) fold
    return scores[:, :n_p], scores[:, n_p:]


def batched_cdi(members: Tensor, nonmembers: Tensor, draw: TrialDraw, k: int = 5, C: float = 1.0,
                max_elements: int = 20_000_000, progress: bool = False, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """CDI p-values for every trial in ``draw`` (§5.2 steps 2-4), solved in batches
    (on ``device``: a GPU solves the logistic regressions much faster than the CPU).

    Returns per-trial ``p`` (one-sided Welch p-value of cross-fitted logits), ``t`` and
    ``cohen_d`` (for the power conversion of App. C.17), plus the scores ``sP``/``sU``.
    """
    F = torch.cat([torch.as_tensor(members), torch.as_tensor(nonmembers)]).double().to(device)
    if not torch.isfinite(F).all():
        raise ValueError("feature matrix contains NaN or inf; fix the feature extraction before dataset inference.")
    T, n = draw.idx_p.shape[0], draw.idx_p.shape[1] + draw.idx_u.shape[1]
    chunk = max(1, max_elements // (k * n * (F.shape[1] + 1)))
    out = {"p": [], "t": [], "cohen_d": [], "sP": [], "sU": []}
    for s in tqdm(range(0, T, chunk), disable=not progress, desc="CDI trials", leave=False):
        sl = slice(s, s + chunk)
        sP, sU = (s.cpu() for s in _cross_fit_batch(F, *(v[sl].to(device) for v in (draw.idx_p, draw.idx_u, draw.fold_p, draw.fold_u)), k, C))
        t, _, p = welch_t_test(sP, sU)
        for key, val in zip(out, (p, t, cohen_d(sP, sU), sP, sU)):
            out[key].append(val)
    return {key: torch.cat(val) for key, val in out.items()}


def loop_cdi(members, nonmembers, draw: TrialDraw, k: int = 5, C: float = 1.0, tol: float = 1e-4) -> np.ndarray:
    """The straightforward reference: one sklearn pipeline per trial and fold, scipy Welch test."""
    F = np.concatenate([np.asarray(members), np.asarray(nonmembers)]).astype(np.float64)
    ps = []
    for i in range(draw.idx_p.shape[0]):
        FP, FU = F[draw.idx_p[i].numpy()], F[draw.idx_u[i].numpy()]
        fp, fu = draw.fold_p[i].numpy(), draw.fold_u[i].numpy()
        sP, sU = np.empty(len(FP)), np.empty(len(FU))
        for j in range(k):
            X = np.concatenate([FP[fp != j], FU[fu != j]])
            y = np.r_[np.ones((fp != j).sum()), np.zeros((fu != j).sum())]
            scores = sklearn_fit_score(X, y, np.concatenate([FP[fp == j], FU[fu == j]]), C=C, tol=tol)
            sP[fp == j], sU[fu == j] = scores[: (fp == j).sum()], scores[(fp == j).sum():]
        ps.append(sps.ttest_ind(sP, sU, equal_var=False, alternative="greater").pvalue)
    return np.asarray(ps)


# --------------------------------------------------------------------------- experiments


def summarize_pvalues(p: Tensor, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Arithmetic mean of the trial p-values (App. C.5: deliberately conservative), its 95 %
    bootstrap percentile interval (always inside [min p, max p], unlike a normal
    approximation on these heavy-tailed values), and the 2.5 / 97.5 % quantiles of the trials."""
    p = p.double()
    g = torch.Generator().manual_seed(seed)
    means = p[torch.randint(0, p.numel(), (n_boot, p.numel()), generator=g)].mean(1)
    return {
        "mean_p": float(p.mean()),
        "ci_low": float(means.quantile(0.025)),
        "ci_high": float(means.quantile(0.975)),
        "q025": float(p.quantile(0.025)),
        "q975": float(p.quantile(0.975)),
    }


def pvalue_curve(members: Tensor, nonmembers: Tensor, sizes: list[int], trials: int = 1000, k: int = 5,
                 u_ratio: float = 1.0, contamination: float = 0.0, C: float = 1.0, seed: int = 0,
                 alpha: float = 0.01, progress: bool = True, device: str = "cpu") -> list[dict]:
    """Mean CDI p-value per suspect-set size |P| (|U| = round(u_ratio |P|)), each over
    ``trials`` fresh random subsets; sizes that the pools cannot supply are skipped."""
    rows = []
    for n_p in tqdm(sizes, disable=not progress, desc="p-value vs |P|"):
        n_u = max(k, int(round(u_ratio * n_p)))
        n_bad = int(round(contamination * n_p))
        if n_p - n_bad > len(members) or n_u + n_bad > len(nonmembers) or n_p < k:
            continue
        draw = draw_trials(len(members), len(nonmembers), n_p, n_u, trials, k, contamination, seed + n_p)
        res = batched_cdi(members, nonmembers, draw, k, C, device=device)
        power = ttest_power(res["cohen_d"], n_p, n_u, alpha)
        rows.append({"n_p": n_p, "n_u": n_u, "contamination": contamination, **summarize_pvalues(res["p"]),
                     "reject_rate": float((res["p"] < alpha).double().mean()),
                     "power_tpr": float(power.mean()), "p_values": res["p"]})
    return rows


def min_suspect_size(curve: list[dict], alpha: float = 0.01) -> int | None:
    """Smallest |P| on the grid whose mean p-value is below ``alpha`` (None if none is)."""
    for row in sorted(curve, key=lambda r: r["n_p"]):
        if row["mean_p"] < alpha:
            return row["n_p"]
    return None


def default_size_grid(max_size: int) -> list[int]:
    """1-2-...-9 x 10^m grid from 2 up to ``max_size`` (the shape of the thesis' reported sizes)."""
    grid, m = [], 0
    while True:
        for a in range(1, 10):
            v = a * 10**m
            if v > max_size:
                return grid
            if v >= 2:
                grid.append(v)
        m += 1


def null_experiment(nonmembers: Tensor, n_p: int, trials: int = 1000, k: int = 5, alpha: float = 0.01,
                    C: float = 1.0, seed: int = 0, device: str = "cpu") -> dict:
    """False-positive check: P and U both drawn (disjointly) from non-members. The rejection
    rate at ``alpha`` must stay near ``alpha``."""
    empty = torch.zeros(0, nonmembers.shape[1], dtype=torch.float64)
    draw = draw_trials(0, len(nonmembers), n_p, n_p, trials, k, contamination=1.0, seed=seed)
    res = batched_cdi(empty, nonmembers, draw, k, C, device=device)
    return {"n_p": n_p, "trials": trials, **summarize_pvalues(res["p"]),
            "false_positive_rate": float((res["p"] < alpha).double().mean()), "p_values": res["p"]}


def pvalue_to_tpr(p_member: Tensor, p_null: Tensor, alpha: float = 0.01) -> float:
    """Empirical TPR@FPR=alpha of the test: ROC of ``1 - p`` over member runs (positives) vs
    null runs (negatives)."""
    from rsgm.metrics.membership import tpr_at_fpr

    scores = torch.cat([1 - p_member.double(), 1 - p_null.double()])
    labels = torch.cat([torch.ones(len(p_member)), torch.zeros(len(p_null))])
    return float(tpr_at_fpr(scores, labels, alpha))
