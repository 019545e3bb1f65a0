"""Dataset-inference statistics (CDI, methods_spec §0.2 and §5.2, §5.6).

Roles: P is the suspect (published) set, U the known non-member reference set. Every
sample carries a feature row; a scoring model turns rows into membership scores (higher
means member) and a one-sided test asks whether P scores higher than U (the default: per
fold permutation p-values of the held-out scores, combined by Stouffer; Welch t-tests for
the other procedures).

The expensive part is resampling: 1000 random (P, U) subsets per |P|, each with 5-fold
cross-fitting, i.e. 5000 logistic regressions per |P|. :func:`batched_cdi` solves all of
them together in torch (on the exact sklearn objective: Anderson-accelerated majorise-
minimise steps; the older selectable solvers take Newton steps), so a whole grid runs in seconds;
:func:`loop_cdi` is the straightforward sklearn loop it is tested against.

Everything here is model-agnostic: it takes feature matrices, whatever produced them.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import threading
from dataclasses import dataclass
from functools import lru_cache, partial

import numpy as np
import torch
from scipy import stats as sps
from torch import Tensor
from tqdm.auto import tqdm

from rsgm.errors import RSGMError


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
    (the sklearn objective, intercept unpenalised).

    X: (B, n, d), y: (n,) or (B, n), w: (B, n). Returns ``(beta, intercept, mean, scale)``.
    """
    X = X.double()
    w = w.double()
    y = torch.broadcast_to(y.double(), w.shape)
    shift = X.mean(1, keepdim=True)
    one = torch.ones(1, 1, dtype=torch.float64, device=X.device)
    beta, b0, mu, sc = _block_lr((X - shift).unsqueeze(1), y.unsqueeze(1), w.unsqueeze(1), one, C, max_iter, tol)
    return beta[:, 0], b0[:, 0], mu[:, 0] + shift[:, 0], sc[:, 0]


SOLVERS = ("auto", "trial", "gather", "pool", "local")
COARSE_TRIAL = 1e-4  # _trial_lr: float32 products until the MM steps are below this, then float64
# _trial_lr stops when every MM step is below this (then takes one more, free): p-values within
# 1e-7 of the exact optimum's at |P| = 10 to 1000 for every procedure (1e-13 as the reference),
# 0.3 to 1 MM step fewer than 1e-8 (benchmarks/cdi_speed.py checks against the sklearn loop)
TRIAL_TOL = 3e-8
POOL_ALL = 0.75  # batched_cdi, auto off the CPU: the pool solver (not trial) when a trial uses at least this fraction of the pool's rows
TRIAL_CHUNK_ELEMENTS = 1_600_000  # batched_cdi, trial solver: float64 elements of the rows of one chunk of trials (12.8 MB)
REFRESH_ABOVE = 1e-3  # a model's Hessian is rebuilt while its largest step exceeds this
POOL_ABOVE = 0.15  # the rule before the trial solver (benchmarks/cdi_speed.py compares): pool above this fraction of the rows, else gather
COARSE_TOL = 1e-4  # pool solver: float32 Newton steps until the steps are below this, then float64
REFRESH_RATE = 0.05  # pool solver: a fit's Hessian is rebuilt while its steps shrink by less than this factor


def _scaler_from_moments(m1: Tensor, m0: Tensor, ex2: Tensor) -> tuple[Tensor, Tensor]:
    """StandardScaler's mean and scale from weighted moments (sum w x, sum w, E[x^2]); a
    constant column (variance below 1e-12 E[x^2]) gets scale 1, as in StandardScaler."""
    mu = m1 / m0.unsqueeze(-1)
    var = (ex2 - mu**2).clamp_min(0)
    return mu, torch.where(var > 1e-12 * ex2, var.sqrt(), torch.ones_like(var))


def _ridge(D: int, device) -> Tensor:
    """The L2 penalty's Hessian (D, D) on standardised coefficients; the intercept (last) is not penalised."""
    reg = torch.eye(D, dtype=torch.float64, device=device)
    reg[-1, -1] = 0.0
    return reg


def _block_lr(X: Tensor, y: Tensor, valid: Tensor, train: Tensor, C: float, max_iter: int = 100, tol: float = 1e-9):
    """The solver behind the CDI statistics: m StandardScaler + L2 logistic regressions per
    design, fitted on unions of row blocks of one shared design matrix.

    X: (T, k, b, d), rows in k blocks of b (padding rows have ``valid`` 0); y, valid: (T, k, b);
    train: (m, k), model j fits the valid rows of the blocks f with train[j, f] = 1. X should
    be centred per design (moments are accumulated per block in one pass).

    Standardisation is folded into the products (z = ((x - mu) / s) . beta + b0), so no
    standardised copy is made. Damped Newton steps (backtracking on the exact objective) with
    the exact float64 gradient; each model's Hessian is rebuilt while its design still moves
    by more than 1e-3 and then frozen (it then changes by less than the step, and it only
    sets the direction: the fixed point is the exact optimum). Designs whose models all moved
    less than ``tol`` drop out. Returns (beta, b0, mu, s), each (T, m, ...).
    """
    T, k, bsz, d = X.shape
    m, N = train.shape[0], k * bsz
    dt, dev = torch.float64, X.device
    Xf = X.reshape(T, N, d)
    Xt = Xf.transpose(1, 2)
    v_ = valid.reshape(T, N)
    w = v_.unsqueeze(1) * train.repeat_interleave(bsz, 1).unsqueeze(0)  # (T, m, N)
    yf = y.reshape(T, 1, N)
    cnt, s1, s2 = valid.sum(-1), (valid.unsqueeze(-1) * X).sum(2), (valid.unsqueeze(-1) * X * X).sum(2)  # per block
    wsum = cnt @ train.T  # (T, m)
    mu = torch.einsum("mk,tkd->tmd", train, s1) / wsum.unsqueeze(-1)
    var = (torch.einsum("mk,tkd->tmd", train, s2) / wsum.unsqueeze(-1) - mu**2).clamp_min(0)
    tiny = (1e-12 * Xf.abs().amax(1, keepdim=True)) ** 2  # constant column (up to round-off): scale 1, as StandardScaler
    sc = torch.where(var > tiny, var.sqrt(), torch.ones_like(var))
    reg = _ridge(d + 1, dev)
    beta = torch.zeros(T, m, d, dtype=dt, device=dev)
    b0 = torch.zeros(T, m, dtype=dt, device=dev)
    z = torch.zeros(T, m, N, dtype=dt, device=dev)
    chol = torch.zeros(T, m, d + 1, d + 1, dtype=dt, device=dev)
    refresh = torch.ones(T, dtype=torch.bool, device=dev)
    active = torch.arange(T, device=dev)
    sign = 2 * yf - 1

    def pick(idx, *ts):
        return ts if idx.numel() == T else tuple(t_[idx] for t_ in ts)

    for _ in range(max_iter):
        idx = active
        Xa, Xta, wa, ya, sa, mua, sca, be, bb, za = pick(idx, Xf, Xt, w, yf, sign, mu, sc, beta, b0, z)
        p = torch.sigmoid(za)
        r = wa * (p - ya)
        rs = r.sum(-1)
        grad = torch.cat([C * (torch.bmm(r, Xa) - rs.unsqueeze(-1) * mua) / sca + be, C * rs.unsqueeze(-1)], -1)
        ri = refresh[idx]
        if ri.any():
            sel = ri.nonzero().squeeze(1)
            full = sel.numel() == idx.numel()
            curv = wa * p * (1 - p)
            args = (Xa, curv, mua, sca) if full else (Xa[sel], curv[sel], mua[sel], sca[sel])
            L = _curvature_cholesky(*args, C, reg)
            if full:
                chol[idx] = L
            else:
                chol[idx[sel]] = L
        step = torch.cholesky_solve(grad.unsqueeze(-1), chol[idx]).squeeze(-1)
        # Backtracking: the longest of 1, 1/2, 1/4, ... that does not increase the objective.
        obj0 = 0.5 * (be**2).sum(-1) + C * (wa * torch.nn.functional.softplus(-sa * za)).sum(-1)
        t = torch.ones(len(idx), m, dtype=dt, device=dev)
        for _h in range(40):
            nb, nb0 = be - t.unsqueeze(-1) * step[..., :d], bb - t * step[..., d]
            vv = nb / sca
            zn = torch.bmm(vv, Xta) + (nb0 - (mua * vv).sum(-1)).unsqueeze(-1)
            obj = 0.5 * (nb**2).sum(-1) + C * (wa * torch.nn.functional.softplus(-sa * zn)).sum(-1)
            bad = obj > obj0 + 1e-12 * obj0.abs()
            if not bad.any():
                break
            t = torch.where(bad, t / 2, t)
        beta[idx], b0[idx], z[idx] = nb, nb0, zn
        moved = (t.unsqueeze(-1) * step).abs().amax(-1).amax(-1)  # per design
        refresh[idx] = moved > REFRESH_ABOVE
        active = idx[moved >= tol]
        if active.numel() == 0:
            break
    else:
        raise RuntimeError(f"{active.numel()} logistic regressions did not converge in {max_iter} iterations.")
    return beta, b0, mu, sc


def _curvature_cholesky(Xf: Tensor, s: Tensor, mu: Tensor, sc: Tensor, C: float, reg: Tensor) -> Tensor:
    """Cholesky factors (T, m, d+1, d+1) of the Hessians C * sum_i s_ji a_ji a_ji' + reg,
    a_ji = ((x_i - mu_j) / sc_j, 1), of m models sharing Xf (T, N, d); s: (T, m, N) holds
    each model's weight x p (1 - p). The O(N m d^2) product is one batched matmul, in float32."""
    T, N, d = Xf.shape
    m = s.shape[1]
    X32, s32 = Xf.float(), s.float()  # the Hessian only sets the direction: float32 is enough
    Z = torch.mul(s32.transpose(1, 2).unsqueeze(-1), X32.unsqueeze(2), out=torch.empty(T, N, m, d, dtype=torch.float32, device=Xf.device))
    M2 = torch.bmm(X32.transpose(1, 2), Z.view(T, N, m * d)).view(T, d, m, d).transpose(1, 2)
    return _hessian_cholesky(M2.double(), torch.bmm(s32, X32).double(), s.sum(-1), mu, sc, C, reg)


def _hessian_cholesky(M2: Tensor, m1: Tensor, m0: Tensor, mu: Tensor, sc: Tensor, C: float, reg: Tensor) -> Tensor:
    """Cholesky factors of C * sum_i s_i a_i a_i' + reg, a_i = ((x_i - mu) / sc, 1), from the
    raw curvature-weighted moments M2 = sum s x x', m1 = sum s x, m0 = sum s (batched)."""
    d = mu.shape[-1]
    mm = mu.unsqueeze(-1) * m1.unsqueeze(-2)
    Hc = (M2 - mm - mm.transpose(-1, -2) + m0[..., None, None] * mu.unsqueeze(-1) * mu.unsqueeze(-2)) / (sc.unsqueeze(-1) * sc.unsqueeze(-2))
    g1 = (m1 - m0.unsqueeze(-1) * mu) / sc
    H = torch.empty(*mu.shape[:-1], d + 1, d + 1, dtype=torch.float64, device=mu.device)
    H[..., :d, :d], H[..., :d, d], H[..., d, :d], H[..., d, d] = Hc, g1, g1, m0
    return torch.linalg.cholesky(C * H + reg)


def _pool_lr(X: Tensor, W1: Tensor, Wt: Tensor, C: float, max_iter: int = 100, tol: float = 1e-9, trace: list | None = None):
    """StandardScaler + L2 logistic regressions whose rows all come from pools of rows: fit
    (g, r) has Wt[g, r, i] copies of row i of its pool, W1[g, r, i] of them labelled 1, the
    rest 0. X is one pool (N, d) shared by every fit (W: (R, 1, N)), or one pool per group
    (G, N, d) (W: (G, r, N), e.g. a trial's own rows for its r fold models).

    Every per-fit quantity is a product with the pool, so the solver runs on GEMMs instead of
    a gathered (fits, rows, d) tensor: the weighted moments of all fits are W @ (N, .)
    products with the pool's rows (standardisation) and per-row outer products (Hessians:
    (N, (d+1)(d+2)/2)); gradients are W @ (N, d+1); logits (d) @ (d, N). With a shared pool
    each of these is one GEMM over all fits. The objective is sklearn's,
    0.5 ||beta||^2 + C sum_i [Wt_i softplus(z_i) - W1_i z_i], evaluated as
    0.5 ||beta||^2 + C [W0 X . v + c sum W0 - sum Wt log sigmoid(z)] for z = X v + c
    (W0 = Wt - W1), so a step costs one sigmoid and (while it is checked) one log-sigmoid
    pass over W's shape.

    Newton's method from beta = 0, where the Hessian is the moments' own (p = 1/2), in two
    phases: float32 until the steps are below ``COARSE_TOL``, then float64 from there to
    ``tol`` (:func:`_pool_newton`). The Hessians are always float32 products: they only set
    the direction; the float64 gradient is exact, so the fixed point is the exact optimum.
    X should be centred and scaled per column (the fits are invariant to it). Wt may be
    float32 (it holds small counts). Returns (beta, b0, mu, sc), each (G, r, ...).
    """
    d = X.shape[-1]
    dt, dev = torch.float64, X.device
    Xa = torch.cat([X, torch.ones(*X.shape[:-1], 1, dtype=dt, device=dev)], -1)
    iu = torch.triu_indices(d + 1, d + 1, device=dev)
    outer32 = (Xa[..., iu[0]] * Xa[..., iu[1]]).float()  # (N, (d+1)(d+2)/2) per pool

    def curvature(S: Tensor, gsel) -> tuple[Tensor, Tensor, Tensor]:
        M = torch.zeros(*S.shape[:2], d + 1, d + 1, dtype=dt, device=dev)
        M[..., iu[0], iu[1]] = torch.matmul(S.float(), outer32 if gsel is None else outer32[gsel]).double()
        M = M + M.triu(1).transpose(-1, -2)
        return M[..., :d, :d], M[..., :d, d], M[..., d, d]

    mom = torch.matmul(Wt.double(), torch.cat([Xa, X * X], -1))  # exact float64 moments: standardisation
    m1, m0, ex2 = mom[..., :d], mom[..., d], mom[..., d + 1:] / mom[..., d : d + 1]
    del mom
    mu, sc = _scaler_from_moments(m1, m0, ex2)
    W1X = torch.matmul(W1.double(), Xa)
    fit = {"w1x": W1X[..., :d], "w1s": W1X[..., d], "w0x": m1 - W1X[..., :d], "w0s": m0 - W1X[..., d], "mu": mu, "sc": sc}
    reg = _ridge(d + 1, dev)
    Wt = Wt.float()
    M2, c1, c0 = curvature(Wt, None)
    state = {"beta": torch.zeros(*Wt.shape[:2], d, dtype=dt, device=dev), "b0": torch.zeros(Wt.shape[:2], dtype=dt, device=dev),
             "chol": _hessian_cholesky(0.25 * M2, 0.25 * c1, 0.25 * c0, mu, sc, C, reg),  # the Hessian at beta = 0
             "last": torch.full(Wt.shape[:2], math.inf, dtype=dt, device=dev)}
    del M2
    _pool_newton(Xa.float(), Wt, fit, state, curvature, C, reg, COARSE_TOL, max_iter // 2, 1e-5, trace, strict=False)
    _pool_newton(Xa, Wt, fit, state, curvature, C, reg, tol, max_iter, 1e-12, trace, refresh_first=True)
    return state["beta"], state["b0"], mu, sc


def _pool_newton(Xa: Tensor, Wt: Tensor, fit: dict, state: dict, curvature, C: float, reg: Tensor, tol: float,
                 max_iter: int, slack: float, trace: list | None, strict: bool = True, refresh_first: bool = False) -> None:
    """Newton iterations of :func:`_pool_lr` in the dtype of the pool Xa (rows and a ones
    column), updating ``state`` (beta, b0, Cholesky factors, last step sizes; (G, r, ...)) in
    place until every fit's step is below ``tol``.

    A group (its r fits together) takes the longest of the steps 1, 1/2, 1/4, ... (per fit)
    that does not increase a fit's objective by more than ``slack`` (relative) while one of
    its steps exceeds ``REFRESH_ABOVE`` or stops contracting; afterwards full steps without
    evaluating the objective. A group's Hessians are rebuilt while one of its fits' steps
    shrinks by less than a factor ``REFRESH_RATE``. Converged groups leave the working set
    (which is compacted, so later passes only touch active groups). ``strict``: raise when
    fits are left after ``max_iter`` (else keep where they are). ``refresh_first``: rebuild
    every Hessian at the start point (the float64 polish starts close to the optimum, where
    one exact Newton step leaves an error of the square of the distance)."""
    dt, dev = Xa.dtype, Xa.device
    d = Xa.shape[-1] - 1
    shared = Xa.dim() == 2
    G = Wt.shape[0]
    idx = torch.arange(G, device=dev)
    w = {k: v.to(dt) for k, v in fit.items()}
    be, bb, last = state["beta"].to(dt), state["b0"].to(dt), state["last"].clone()
    wt, Xg = Wt, Xa

    def logits(v, c, X_):
        return torch.matmul(v, X_[..., :d].transpose(-1, -2)).add_(c.unsqueeze(-1))

    def objective(nb, v, c, w0x, w0s, wt_, z_):  # log sigmoid(z) exactly, also where sigmoid(z) underflows
        return 0.5 * (nb**2).sum(-1) + C * ((w0x * v).sum(-1) + c * w0s - torch.linalg.vecdot(wt_.to(dt), torch.nn.functional.logsigmoid(z_)))

    v0 = be / w["sc"]
    z = logits(v0, bb - (w["mu"] * v0).sum(-1), Xg)
    ob = torch.zeros(be.shape[:2], dtype=dt, device=dev)
    valid = torch.zeros(G, dtype=torch.bool, device=dev)
    refresh = torch.full((G,), refresh_first, dtype=torch.bool, device=dev)
    search = (last > REFRESH_ABOVE).any(-1)
    last = torch.full_like(last, math.inf)  # no rate yet in this dtype

    def rows(mask):
        sel = mask.nonzero().squeeze(1)
        return (lambda x: x) if sel.numel() == mask.numel() else (lambda x: x[sel]), sel

    for _ in range(max_iter):
        mu, sc = w["mu"], w["sc"]
        p = torch.sigmoid(z)
        wp = wt * p
        ga = torch.matmul(wp, Xg)
        rs = ga[..., d] - w["w1s"]
        grad = torch.cat([C * (ga[..., :d] - w["w1x"] - rs.unsqueeze(-1) * mu) / sc + be, C * rs.unsqueeze(-1)], -1).double()
        n_refresh = int(refresh.sum())
        if n_refresh:
            g, sel = rows(refresh)
            s = torch.addcmul(g(wp), g(wp), g(p), value=-1)
            state["chol"][idx[sel]] = _hessian_cholesky(*curvature(s, None if shared else idx[sel]), g(mu).double(), g(sc).double(), C, reg)
            del s
        del wp, p
        step = torch.cholesky_solve(grad.unsqueeze(-1), state["chol"][idx]).squeeze(-1).to(dt)
        t = torch.ones(be.shape[:2], dtype=dt, device=dev)
        nb, nb0 = be - step[..., :d], bb - step[..., d]
        v = nb / sc
        zn = logits(v, nb0 - (mu * v).sum(-1), Xg)
        if search.any():  # backtracking on the exact objective
            g, sel = rows(search)
            need = ~valid[sel]
            if need.any():  # objective at the current point
                j = sel[need.nonzero().squeeze(1)]
                vj = be[j] / sc[j]
                ob[j] = objective(be[j], vj, bb[j] - (mu[j] * vj).sum(-1), w["w0x"][j], w["w0s"][j], wt[j], z[j])
            ts, zns, obs = g(t), g(zn), g(ob)
            bes, bbs, sts, scs, mus, w0xs, w0ss, wts = (g(x) for x in (be, bb, step, sc, mu, w["w0x"], w["w0s"], wt))
            Xs = Xg if shared else g(Xg)
            for _h in range(40):
                nbs, nb0s = bes - ts.unsqueeze(-1) * sts[..., :d], bbs - ts * sts[..., d]
                vs = nbs / scs
                cs = nb0s - (mus * vs).sum(-1)
                on = objective(nbs, vs, cs, w0xs, w0ss, wts, zns)
                bad = on > obs + slack * obs.abs()
                if not bad.any():
                    break
                ts = torch.where(bad, ts / 2, ts)
                zns = torch.where(bad.unsqueeze(-1), logits(vs, cs, Xs), zns)
            if sel.numel() == G:
                t, zn, ob = ts, zns, on
            else:
                t[sel], zn[sel], ob[sel] = ts, zns, on
            nb, nb0 = be - t.unsqueeze(-1) * step[..., :d], bb - t * step[..., d]
        valid = search.clone()
        moved = (t.unsqueeze(-1) * step).abs().amax(-1).double()  # (G, r)
        refresh = ((moved > REFRESH_RATE * last) & (moved > 10 * tol)).any(-1)
        search = ((moved > REFRESH_ABOVE) | (moved > 0.5 * last) | (t < 1)).any(-1)
        if trace is not None:
            trace.append((str(dt)[-2:], len(idx), n_refresh, int(search.sum()), float(moved.max())))
        be, bb, z, last = nb, nb0, zn, moved
        done = (moved < tol).all(-1)
        if done.any():  # converged groups leave the working set
            j = idx[done]
            state["beta"][j], state["b0"][j], state["last"][j] = be[done].double(), bb[done].double(), last[done]
            keep = ~done
            if not keep.any():
                return
            idx, be, bb, z, last, wt, ob, valid, refresh, search = (x[keep] for x in (idx, be, bb, z, last, wt, ob, valid, refresh, search))
            w = {k: v[keep] for k, v in w.items()}
            if not shared:
                Xg = Xg[keep]
        G = len(idx)
    if not strict:
        state["beta"][idx], state["b0"][idx], state["last"][idx] = be.double(), bb.double(), last
        return
    raise RuntimeError(f"{int(idx.numel())} groups of logistic regressions did not converge in {max_iter} iterations.")


ANDERSON_MEMORY = 3  # _trial_lr: Anderson acceleration over the last this many MM steps


def _trial_lr(Xa: Tensor, y: Tensor, starts: list[int], train: Tensor, C: float, max_iter: int = 200, tol: float = TRIAL_TOL,
              trace: list | None = None):
    """StandardScaler + L2 logistic regressions, m per trial, each on a union of fold blocks of
    that trial's own rows: Böhning's majorise-minimise iteration accelerated by Anderson mixing.

    Xa: (T, N, d+1) the trials' rows sorted by fold (fold f at rows starts[f]:starts[f+1] in
    every trial), with a ones column last; the columns should be roughly centred and scaled
    (one-pass moments then lose nothing; the fits are invariant to it). y: (T, N) labels;
    train: (m, k) 0/1, model j fits the folds with train[j, f] = 1. Minimises sklearn's
    objective 0.5 ||beta||^2 + C sum_i softplus(-(2 y_i - 1) z_i) on the standardised rows.

    The curvature of the logistic loss is at most 1/4, so B = C Z'Z / 4 + I (Z: standardised
    rows and ones) bounds every Hessian: the step -B^-1 grad never increases the objective
    (Böhning and Lindsay 1988). B needs no fitted value: it comes from one Gram matrix per fold
    block (Z'Z of a model is a sum of its folds' blocks, standardised through the moments; the
    Gram in float32, the sums that standardise in float64), so it is built and inverted once.
    The step is linear in (beta, X'r) (r: the residuals sigmoid(z) - y), so one (d+1) x 2(d+1)
    matrix per model, built with B, turns them into the step. Plain MM contracts linearly
    (about 0.3 per step here); Anderson acceleration (type II over the last ``ANDERSON_MEMORY``
    steps, a model whose step grew forgets its memory) reaches ``tol`` in about 8 steps at
    |P| = 1000 (15 at |P| = 100, 30 at |P| = 30, where the fits are nearly separable). A step
    evaluates, per fold block, the logits and X'r of only the models that fit the block (two
    GEMMs per block), in float32 until the steps are below ``COARSE_TRIAL`` and then in
    float64. The fixed point is where the exact float64 gradient vanishes, i.e. the sklearn
    optimum. Returns (beta, b0, mu, sc) (T, m, ...) and a (T,) mask of the trials that converged.
    """
    T, N, D = Xa.shape
    d, m = D - 1, train.shape[0]
    dt, dev = torch.float64, Xa.device
    spans = list(zip(starts[:-1], starts[1:]))
    trainf = train.to(dt)
    X32 = _scratch_tensor("rows32", Xa.shape, torch.float32, dev).copy_(Xa)
    G = torch.stack([torch.bmm(X32[:, a:b, :d].transpose(1, 2), X32[:, a:b, :d]) for a, b in spans], 1).double()  # (T, k, d, d): bounds only
    s12 = torch.stack([torch.cat([Xa[:, a:b].sum(1), (Xa[:, a:b] * Xa[:, a:b]).sum(1)], -1) for a, b in spans], 1)  # exact: standardises
    m1, ex2 = torch.einsum("mk,tkc->tmc", trainf, s12).split(D, -1)
    m0, m1 = m1[..., d], m1[..., :d]
    mu, sc = _scaler_from_moments(m1, m0, ex2[..., :d] / m0.unsqueeze(-1))
    LB = _hessian_cholesky(0.25 * torch.einsum("mk,tkab->tmab", trainf, G), 0.25 * m1, 0.25 * m0, mu, sc, C, _ridge(D, dev))
    nBinv = -torch.cholesky_inverse(LB)
    # The gradient in standardised coefficients is P x + C Mt (X'r) (P: the penalty, not on the
    # intercept; Mt = [[diag(1 / sc), -mu / sc], [0, 1]]: the chain rule through the
    # standardisation), so the MM step is W (x, X'r), W = -B^-1 [P, C Mt].
    zero = torch.zeros_like(nBinv[..., :1])
    W = torch.cat([nBinv[..., :d], zero, nBinv[..., :d] / sc.unsqueeze(-2), zero], -1)  # (T, m, D, 2D)
    W[..., -1] = nBinv[..., d] - torch.linalg.vecdot(W[..., D:-1], mu.unsqueeze(-2))
    W[..., D:] *= C
    blocks = [(a, b, js) for (a, b), js in zip(spans, map(_index_or_slice, train.T)) if js is not None]  # with the models that fit them
    work = {X_.dtype: [(X_[:, a:b], X_[:, a:b].transpose(1, 2), y[:, None, a:b].to(X_.dtype), js) for a, b, js in blocks] for X_ in (Xa, X32)}
    ga = {k_: torch.empty(T, m, D, dtype=k_, device=dev) for k_ in work}
    lo = COARSE_TRIAL > tol  # float32 products while the steps are large
    x = torch.zeros(T, m, D, dtype=dt, device=dev)  # standardised coefficients, intercept last
    xg = torch.empty(T, m, 2 * D, dtype=dt, device=dev)  # (x, X'r)
    coef = torch.empty(T, m, D, dtype=dt, device=dev)
    DX = DF = xp = fp = prev = None
    for _ in range(max_iter):
        torch.div(x[..., :d], sc, out=coef[..., :d])  # raw coefficients: z = x_i . coef
        torch.sub(x[..., d], torch.linalg.vecdot(mu, coef[..., :d]), out=coef[..., d])
        pdt = torch.float32 if lo else dt
        cf, g = coef.to(pdt), ga[pdt].zero_()
        for Xb, XbT, yb, js in work[pdt]:  # residuals of the models that fit the block
            r = torch.bmm(cf[:, js], XbT).sigmoid_().sub_(yb)
            if isinstance(js, slice):
                g[:, js] += torch.bmm(r, Xb)
            else:
                g.index_add_(1, js, torch.bmm(r, Xb))
        xg[..., :D], xg[..., D:] = x, g
        f = torch.linalg.vecdot(W, xg.unsqueeze(-2))  # the MM step
        size = f.abs().amax(-1)  # (T, m)
        big = float(size.max())
        if trace is not None:
            trace.append(big)
        if big < tol and not lo:  # one more MM step is free: its error is a fraction of tol
            x = x + f
            return x[..., :d], x[..., d], mu, sc, torch.ones(T, dtype=torch.bool, device=dev)
        if big < COARSE_TRIAL and lo:
            lo = False
            DX = xp = None  # differences of float32 steps are noisy at this scale: start the memory afresh
        if xp is not None:
            dx, df = (x - xp).unsqueeze(2), (f - fp).unsqueeze(2)
            DX, DF = (dx, df) if DX is None else (torch.cat([DX[:, :, 1 - ANDERSON_MEMORY:], dx], 2), torch.cat([DF[:, :, 1 - ANDERSON_MEMORY:], df], 2))
            grew = size > prev
            if bool(grew.any()):  # a model's MM step grew: forget its memory (its next step is plain MM)
                keep = (~grew).to(dt)[..., None, None]
                DX, DF = DX * keep, DF * keep
        prev, xp, fp = size, x, f
        if DX is None:
            x = x + f
            continue
        A = DF @ DF.mT  # Anderson's weights: argmin_g ||f - DF' g||, ridge 1e-12 of the trace (0 for a forgotten memory)
        A.diagonal(dim1=-2, dim2=-1).add_(1e-12 * A.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True) + 1e-100)
        gam = torch.linalg.solve_ex(A, DF @ f.unsqueeze(-1))[0]  # (T, m, h, 1)
        x = torch.where((size < tol).unsqueeze(-1), x, x + f - ((DX + DF) * gam).sum(2))
    return x[..., :d], x[..., d], mu, sc, (size < tol).all(-1)


def _index_or_slice(mask: Tensor) -> slice | Tensor | None:
    """The positions where ``mask`` is nonzero, as a slice when they are one run (a view, no
    copy: sequential folds), else a long tensor; None when there are none."""
    js = mask.nonzero().squeeze(1)
    if js.numel() == 0:
        return None
    lo, hi = int(js[0]), int(js[-1]) + 1
    return slice(lo, hi) if hi - lo == js.numel() else js


def _fit_and_score_trial(F: Tensor, draw: TrialDraw, proc: Procedure, C: float, Fa: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """As :func:`_fit_and_score`, with each trial's rows sorted by fold (balanced folds: the same
    block boundaries in every trial, no padding) and the solver :func:`_trial_lr`; trials it
    leaves unconverged are solved again with :func:`_fit_and_score_pool`. ``Fa``:
    :func:`_standardised_with_ones` of F, when the caller has it."""
    Fa = _standardised_with_ones(F) if Fa is None else Fa
    T, n_p = draw.idx_p.shape
    dev = F.device
    idx = torch.cat([draw.idx_p, draw.idx_u], 1)
    fold = torch.cat([draw.fold_p, draw.fold_u], 1)
    n = idx.shape[1]
    order = torch.sort(fold, dim=1, stable=True).indices  # rows by fold, in draw order within a fold
    starts = [0, *torch.cumsum(torch.bincount(fold[0], minlength=proc.folds), 0).tolist()]  # balanced: batched_cdi checks
    last = max(f for fs in proc.train for f in fs) + 1  # rows past the last fitted fold are only scored
    Xa = _rows(Fa, idx.gather(1, order))  # (T, n, d+1), by fold
    y = (order < n_p).double()
    beta, b0, mu, sc, ok = _trial_lr(Xa[:, : starts[last]], y[:, : starts[last]], starts[: last + 1], proc.train_matrix(device=dev)[:, :last], C)
    v = beta / sc
    coef = torch.cat([v, (b0 - (mu * v).sum(-1)).unsqueeze(-1)], -1)  # (T, m, d+1): raw coefficients, intercept last
    sc_sorted = torch.full((T, n), float("nan"), dtype=torch.float64, device=dev)
    for f, j in enumerate(proc.score):  # fold f's rows scored by model j only
        if j >= 0:
            a, b = starts[f], starts[f + 1]
            sc_sorted[:, a:b] = torch.bmm(coef[:, j : j + 1], Xa[:, a:b].transpose(1, 2)).squeeze(1)
    scores = torch.empty_like(sc_sorted).scatter_(1, order, sc_sorted)
    if not bool(ok.all()):
        bad = (~ok).nonzero().squeeze(1)
        scores[bad] = _fit_and_score_pool(F, draw[bad], proc, C)[0]
        sc_sorted[bad] = scores[bad].gather(1, order[bad])
    return scores, sc_sorted


_scratch = threading.local()


@lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Tell glibc's allocator to keep freed memory for reuse instead of returning it to the
    operating system: blocks up to 32 MiB come from the heap (M_MMAP_THRESHOLD) and up to
    128 MiB of free memory stays with each arena (M_TRIM_THRESHOLD). The statistics allocate
    and free megabyte tensors thousands of times per run; with glibc's defaults each reuse
    faulted its pages in again (30-45 thousand page faults per 1000 trials at |P| = 1000, a
    few thousand at most with this; about 5 % of the wall time). Process-wide and once; glibc only
    (elsewhere, or with ``RSGM_KEEP_FREED_MEMORY=0``, it does nothing and returns False)."""
    if os.environ.get("RSGM_KEEP_FREED_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 128 << 20))


def _scratch_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
    """An uninitialised tensor from a buffer of the calling thread (``name``: one buffer per
    use), which the next call with that name overwrites: the trial solver's per-chunk tensors
    (megabytes, the same size every chunk) would otherwise get fresh pages every chunk, which
    cost more than filling them. On a GPU, a plain ``torch.empty`` (its allocator caches)."""
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    need = math.prod(shape)
    buf = getattr(_scratch, name, None)
    if buf is None or buf.numel() < need or buf.dtype != dtype:
        buf = torch.empty(need, dtype=dtype)
        setattr(_scratch, name, buf)
    return buf[:need].view(shape)


def _rows(F: Tensor, rows: Tensor) -> Tensor:
    """F[rows] (rows: (T, n) -> (T, n, d)) in the calling thread's scratch buffer."""
    out = _scratch_tensor("rows", (rows.numel(), F.shape[1]), F.dtype, F.device)
    torch.index_select(F, 0, rows.reshape(-1), out=out)
    return out.view(*rows.shape, F.shape[1])


def _standardised(F: Tensor) -> Tensor:
    """F's columns centred and scaled (a constant column only centred): the StandardScaler fits
    are invariant to it, and one-pass moments of any subset of its rows lose no precision to a
    column's offset."""
    s = F.std(0)
    return (F - F.mean(0)) / torch.where(s > 0, s, torch.ones_like(s))


def _standardised_with_ones(F: Tensor) -> Tensor:
    """:func:`_standardised` F and a ones column (the intercept's)."""
    return torch.cat([_standardised(F), torch.ones(len(F), 1, dtype=F.dtype, device=F.device)], 1)


# --------------------------------------------------------------------------- resampling


@dataclass
class TrialDraw:
    """Row indices into ``cat([members, non_members])`` for each trial, and fold ids.

    idx_p: (T, n_p), idx_u: (T, n_u), fold_p: (T, n_p), fold_u: (T, n_u)."""

    idx_p: Tensor
    idx_u: Tensor
    fold_p: Tensor
    fold_u: Tensor

    def __getitem__(self, sl) -> "TrialDraw":
        return TrialDraw(self.idx_p[sl], self.idx_u[sl], self.fold_p[sl], self.fold_u[sl])

    def __len__(self) -> int:
        return self.idx_p.shape[0]


@dataclass(frozen=True)
class Procedure:
    """How P and U are split into folds, which folds fit which scoring model, which folds are
    scored, and how the scores become a p-value.

    ``folds``: number of folds per set; ``train[j]``: folds that fit model j; ``score[f]``:
    model that scores fold f (-1: fold only used for fitting). ``per_fold_welch``: the
    fold-stratified Welch test of :func:`_statistic` instead of one Welch test on all scored rows.
    ``fold_permutations`` > 0 (with ``per_fold_welch``): instead of Welch's t distribution, each
    scored fold's p-value comes from that many relabelings of its held-out scores
    (:func:`fold_permutation_pvalue`), combined over folds by Stouffer's method."""

    name: str
    folds: int
    train: tuple[tuple[int, ...], ...]
    score: tuple[int, ...]
    per_fold_welch: bool = False
    description: str = ""
    fold_permutations: int = 0

    def train_matrix(self, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
        """(models, folds) 0/1: entry (j, f) is 1 when fold f fits model j."""
        train = torch.zeros(len(self.train), self.folds, dtype=dtype, device=device)
        for j, fs in enumerate(self.train):
            train[j, list(fs)] = 1.0
        return train

    @property
    def min_set_size(self) -> int:
        """Smallest |P| (and |U|) the procedure is defined for: two scored rows per fold and set."""
        return 2 * self.folds if self.per_fold_welch else max(self.folds, 4)


def _crossfit(k: int) -> Procedure:
    return Procedure("crossfit", k, tuple(tuple(f for f in range(k) if f != j) for j in range(k)), tuple(range(k)),
                     description=f"thesis (§5.2): {k}-fold cross-fitting, one Welch test on all cross-fitted scores")


def _split() -> Procedure:
    return Procedure("split", 2, ((0,),), (-1, 0), description="split-sample: fit on one half of P and U, Welch test on the held-out half")


def _sequential(k: int) -> Procedure:
    # Fold f (f >= 1) is scored by a model fitted on folds 0..f-1 only: the fold differences
    # form a martingale-difference sequence, so they are uncorrelated under the null.
    return Procedure("sequential", k, tuple(tuple(range(j + 1)) for j in range(k - 1)), (-1, *range(k - 1)),
                     description=f"forward-chained {k} folds: fold f scored by a model fitted on folds < f, one Welch test")


def _crossfit_stratified(k: int) -> Procedure:
    return Procedure("crossfit_stratified", k, _crossfit(k).train, _crossfit(k).score, per_fold_welch=True,
                     description=f"{k}-fold cross-fitting, fold-stratified Welch test")


PROCEDURES = ("split", "crossfit", "sequential", "sequential_stratified", "crossfit_stratified", "sequential_permutation")
DEFAULT_PROCEDURE = "sequential_permutation"


def _sequential_stratified(k: int) -> Procedure:
    seq = _sequential(k)
    return Procedure("sequential_stratified", k, seq.train, seq.score, per_fold_welch=True,
                     description=f"forward-chained {k} folds (fold f scored by a model fitted on folds < f), fold-stratified Welch test")


def _sequential_permutation(k: int, permutations: int = 999) -> Procedure:
    seq = _sequential(k)
    return Procedure("sequential_permutation", k, seq.train, seq.score, per_fold_welch=True, fold_permutations=permutations,
                     description=f"forward-chained {k} folds (fold f scored by a model fitted on folds < f), per-fold permutation "
                                 f"p-values of the held-out scores ({permutations} relabelings, no refit), combined by Stouffer")


def make_procedure(name: str, k: int = 5) -> Procedure:
    table = {"sequential_permutation": lambda: _sequential_permutation(k), "crossfit": lambda: _crossfit(k), "split": _split, "sequential": lambda: _sequential(k),
             "crossfit_stratified": lambda: _crossfit_stratified(k), "sequential_stratified": lambda: _sequential_stratified(k)}
    if name not in table:
        raise RSGMError(f"unknown CDI procedure '{name}'; choose one of {sorted(table)}.")
    return table[name]()


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


def _fit_and_score(F: Tensor, draw: TrialDraw, proc: Procedure, C: float) -> tuple[Tensor, Tensor]:
    """Scores (T, n) of every row of each trial (NaN where the row is not scored), in draw
    order and by fold (:func:`_by_fold`'s layout). Rows are regrouped into equal, zero-padded
    fold blocks for the solver."""
    T, n_p = draw.idx_p.shape
    dev = F.device
    idx = torch.cat([draw.idx_p, draw.idx_u], 1)
    fold = torch.cat([draw.fold_p, draw.fold_u], 1)
    n, k = idx.shape[1], proc.folds
    y = torch.cat([torch.ones(n_p), torch.zeros(n - n_p)]).double().to(dev).expand(T, n)
    # Position of every row inside its fold block (padded to the largest fold of any trial).
    order = torch.argsort(fold * n + torch.arange(n, device=dev), dim=1)
    sorted_fold = fold.gather(1, order)
    counts = torch.nn.functional.one_hot(fold, k).sum(1)  # (T, k)
    bsz = int(counts.max())
    start = torch.cumsum(counts, 1) - counts
    slot = sorted_fold * bsz + torch.arange(n, device=dev) - start.gather(1, sorted_fold)  # (T, n) in [0, k*bsz)
    X = F[idx.gather(1, order)]
    X = X - X.mean(1, keepdim=True)  # centring per trial: exact one-pass moments, same fits
    Xb = torch.zeros(T, k * bsz, F.shape[1], dtype=torch.float64, device=dev).scatter_(1, slot.unsqueeze(-1).expand_as(X), X)
    yb = torch.zeros(T, k * bsz, dtype=torch.float64, device=dev).scatter_(1, slot, y.gather(1, order))
    vb = torch.zeros(T, k * bsz, dtype=torch.float64, device=dev).scatter_(1, slot, torch.ones_like(y))
    train = proc.train_matrix(device=dev)
    beta, b0, mu, sc = _block_lr(Xb.view(T, k, bsz, -1), yb.view(T, k, bsz), vb.view(T, k, bsz), train, C)
    v = beta / sc
    z = torch.bmm(v, Xb.transpose(1, 2)) + (b0 - (mu * v).sum(-1)).unsqueeze(-1)  # (T, m, k*bsz)
    model = torch.tensor(proc.score, device=dev)[sorted_fold]  # (T, n), sorted order
    zs = z.gather(2, slot.unsqueeze(1).expand(T, z.shape[1], n))  # (T, m, n) sorted order
    sc_sorted = zs.gather(1, model.clamp_min(0).unsqueeze(1)).squeeze(1)
    sc_sorted = torch.where(model >= 0, sc_sorted, torch.full_like(sc_sorted, float("nan")))
    scores = torch.empty_like(sc_sorted).scatter_(1, order, sc_sorted)
    return scores, sc_sorted


def _fit_and_score_pool(F: Tensor, draw: TrialDraw, proc: Procedure, C: float, local: bool = False) -> tuple[Tensor, Tensor]:
    """As :func:`_fit_and_score`, with every fold model as a weight vector over a pool of rows
    (the solver :func:`_pool_lr`): the rows all trials draw from (one GEMM per product over
    all fits: the faster way when each trial uses a good part of them, as with permutations),
    or with ``local`` each trial's own rows."""
    T, n_p = draw.idx_p.shape
    dev = F.device
    idx = torch.cat([draw.idx_p, draw.idx_u], 1)
    fold = torch.cat([draw.fold_p, draw.fold_u], 1)
    n, m = idx.shape[1], len(proc.train)
    used, inv = torch.unique(idx, return_inverse=True)
    X = _standardised(F[used])
    train = proc.train_matrix(torch.float32, dev)
    src = train[:, fold].transpose(0, 1)  # (T, m, n): 1 where row i fits model j
    y = torch.cat([torch.ones(n_p), torch.zeros(n - n_p)]).to(dev)
    model = torch.tensor(proc.score, device=dev)[fold]  # (T, n)
    if local:
        X = X[inv]  # (T, n, d)
        beta, b0, mu, sc = _pool_lr(X, src * y, src, C)
        v = beta / sc
        z = torch.baddbmm((b0 - (mu * v).sum(-1)).unsqueeze(-1), v, X.transpose(1, 2))  # (T, m, n)
        scores = z.gather(1, model.clamp_min(0).unsqueeze(1)).squeeze(1)
    else:
        at = inv.unsqueeze(1).expand(T, m, n)
        N = len(used)
        W1 = torch.zeros(T * m, 1, N, dtype=torch.float32, device=dev).view(T, m, N).scatter_add_(2, at, src * y)
        Wt = torch.zeros(T * m, 1, N, dtype=torch.float32, device=dev).view(T, m, N).scatter_add_(2, at, src)  # small counts: exact
        beta, b0, mu, sc = _pool_lr(X, W1.view(T * m, 1, N), Wt.view(T * m, 1, N), C)
        del W1, Wt
        v = beta.view(T * m, -1) / sc.view(T * m, -1)
        z = torch.addmm((b0.view(-1) - (mu.view(T * m, -1) * v).sum(-1)).unsqueeze(-1), v, X.T).view(T, m * N)
        scores = z.gather(1, model.clamp_min(0) * N + inv)
    scores = torch.where(model >= 0, scores, torch.full_like(scores, float("nan")))
    return scores, _by_fold(scores, fold)


def _by_fold(scores: Tensor, fold: Tensor) -> Tensor:
    """Each trial's scores (T, n) sorted by fold, in draw order within a fold (so a fold's P rows
    come before its U rows): with balanced folds every fold is one column slice."""
    return scores.gather(1, torch.sort(fold, dim=1, stable=True).indices)


def t_sf(t: Tensor, df: Tensor) -> Tensor:
    """Upper tail of Student's t (scipy, float64), for tensors on any device."""
    return torch.from_numpy(np.asarray(sps.t.sf(t.double().cpu().numpy(), df.double().cpu().numpy()), dtype=np.float64))


@lru_cache(maxsize=64)
def fold_relabelings(n_a: int, n_b: int, permutations: int, seed: int) -> tuple[Tensor, Tensor]:
    """``permutations + 1`` uniformly random labellings of a fold's n_a + n_b positions (n_a
    called P), from ``seed``: ``(E, place)`` with E (n_a + n_b, permutations + 1) float64 0/1,
    column c marking the P positions of labelling c, and place (permutations + 1, n_a + n_b)
    long, the P positions of labelling c first, then its U positions. Cached: every trial and
    every chunk of trials uses the same matrix."""
    rows = np.tile(np.arange(n_a + n_b), (permutations + 1, 1))
    place = torch.from_numpy(np.random.default_rng(seed).permuted(rows, axis=1))  # Fisher-Yates per row: no sort
    E = torch.zeros(n_a + n_b, permutations + 1, dtype=torch.float64)
    E.T.scatter_(1, place[:, :n_a], 1.0)
    return E, place


def fold_permutation_pvalue(a: Tensor, b: Tensor, E: Tensor, place: Tensor, c: Tensor, u: Tensor) -> Tensor:
    """Randomised permutation p-value of one fold's held-out scores, batched over trials.

    a: (T, n_a) scores of P, b: (T, n_b) of U; E, place: from :func:`fold_relabelings`
    (B + 1 labellings); c: (T,) long, u: (T,) uniforms in (0, 1). Each trial lays its scores out
    on labelling c (its P scores on c's P positions), so the observed labelling is labelling c
    and the other B labellings are the relabelings. The statistic is S = sum of the scores
    labelled P (for fixed pooled scores a monotone function of the mean difference);
    p = (#{S_b > S_c} + u (1 + #{b != c: S_b = S_c})) / (1 + B). With c uniform, the observed
    and the B relabelings are B + 1 exchangeable labellings whenever the fold's rows are
    exchangeable given the model that scores them (H0), so p is exactly uniform on (0, 1) for any
    B and any score distribution; ties (small folds, constant scores) are split by u. (Placing
    the scores on a random labelling matters: the labellings are shared by the trials, and
    with P always on the same positions how often the shared relabelings happen to repeat the
    observed one, in a small fold, would shift every trial's p the same way.)
    One GEMM (T, n) x (n, B + 1) per fold."""
    s = torch.cat([a, b], 1).to(E.dtype)
    s = s - s.mean(1, keepdim=True)
    v = torch.empty_like(s).scatter_(1, place[c], s)
    S = v @ E
    diff = S - S.gather(1, c.unsqueeze(1))
    tol = 1e-9 * s.abs().sum(1, keepdim=True)  # equal subsets summed in another order: a tie
    above = (diff > tol).sum(1)
    tied = (diff >= -tol).sum(1) - above - 1  # not the observed itself
    return (above + u * (1 + tied)) / E.shape[1]


def _fold_blocks(by_fold: Tensor, fold_p: Tensor, fold_u: Tensor, proc: Procedure) -> list[tuple[int, Tensor, Tensor]]:
    """(f, P scores (T, n_P,f), U scores (T, n_U,f)) of every scored fold f, as column slices of
    the scores laid out by fold (:func:`_by_fold`); fold_p, fold_u: one trial's folds (balanced
    folds: the same counts in every trial)."""
    blocks, a = [], 0
    for f in range(proc.folds):
        cp, cu = int((fold_p == f).sum()), int((fold_u == f).sum())
        if proc.score[f] >= 0:
            blocks.append((f, by_fold[:, a : a + cp], by_fold[:, a + cp : a + cp + cu]))
        a += cp + cu
    return blocks


def _statistic(blocks: list[tuple[int, Tensor, Tensor]], proc: Procedure, perm: tuple | None = None) -> tuple[Tensor, Tensor]:
    """(t, p) per trial from the scored folds' blocks (:func:`_fold_blocks`): one Welch test
    over all scored rows, or (``per_fold_welch``) the fold-stratified Welch test: each scored
    fold's mean difference in units of that fold's score scale, D_f = (mean_P,f - mean_U,f) / s_f,
    summed, over the square root of the summed Welch variances V_f = (var_P,f / n_P,f +
    var_U,f / n_U,f) / s_f^2, with the Welch-Satterthwaite df pooled over folds. Folds scored by
    different models thus enter on one scale, and the df stay large when each fold is small."""
    if not proc.per_fold_welch:
        t, _, p = welch_t_test(torch.cat([a for _, a, _ in blocks], 1), torch.cat([b for _, _, b in blocks], 1))
        return t, p
    if proc.fold_permutations:  # Stouffer: z = sum_f Phi^-1(1 - p_f) / sqrt(#folds), exactly N(0, 1) under H0
        relabel, c, u = perm
        z = torch.zeros(len(c), dtype=torch.float64)
        for f, a, b in blocks:
            z -= torch.special.ndtri(fold_permutation_pvalue(a, b, *relabel[f], c[:, f], u[:, f]).clamp_min(1e-300))
        z /= math.sqrt(len(blocks))
        return z, torch.special.ndtr(-z)
    num = var = dfden = 0.0
    for _, a, b in blocks:
        scale2 = torch.cat([a, b], 1).var(-1)
        na, nb = a.shape[-1], b.shape[-1]
        va, vb = a.var(-1) / na / scale2, b.var(-1) / nb / scale2
        num = num + (a.mean(-1) - b.mean(-1)) / scale2.sqrt()
        var = var + va + vb
        dfden = dfden + va**2 / (na - 1) + vb**2 / (nb - 1)
    t = num / var.sqrt()
    return t, t_sf(t, var**2 / dfden)


def batched_cdi(members: Tensor, nonmembers: Tensor, draw: TrialDraw, k: int = 5, C: float = 1.0,
                max_elements: int = 20_000_000, progress: bool = False, device: str | torch.device = "cpu",
                procedure: str | Procedure = "crossfit", solver: str = "auto", seed: int = 0) -> dict[str, Tensor]:
    """CDI p-values for every trial in ``draw`` (§5.2 steps 2-4), solved in batches
    (on ``device``: a GPU solves the logistic regressions much faster than the CPU).

    ``procedure`` (see :data:`PROCEDURES`) fixes the folds of ``draw``: ``draw`` must use its
    ``folds`` (5 for crossfit, 2 for split). Returns per-trial ``p``, ``t`` and ``cohen_d``
    (for the power conversion of App. C.17), plus the scores ``sP``/``sU`` (NaN: not scored).

    ``solver``: ``"trial"`` (each trial's rows sorted by fold, Böhning's bound and Anderson-
    accelerated MM steps, :func:`_trial_lr`), ``"gather"`` (rows gathered into fold blocks,
    Newton, :func:`_block_lr`), ``"pool"`` (every fold model a weight vector over the rows the
    trials draw from, :func:`_pool_lr`), ``"local"`` (the pool solver on each trial's own rows)
    or ``"auto"``: trial on the CPU; on other devices pool when a trial uses at least
    ``POOL_ALL`` of the rows the trials draw from (permutations, null checks on a small
    reference set), else trial. All solve the same
    problems to the same optimum (``benchmarks/cdi_speed.py`` times them).

    ``seed`` draws the relabelings (and tie-breaking uniforms) of a procedure with
    ``fold_permutations``: the same seed gives the same p-values.
    """
    proc = procedure if isinstance(procedure, Procedure) else make_procedure(procedure, k)
    F = torch.cat([torch.as_tensor(members), torch.as_tensor(nonmembers)]).double().to(device)
    if not torch.isfinite(F).all():
        raise RSGMError("feature matrix contains NaN or inf; fix the feature extraction before dataset inference.")
    if int(max(draw.fold_p.max(), draw.fold_u.max())) >= proc.folds:
        raise ValueError(f"procedure '{proc.name}' uses {proc.folds} folds; draw the trials with k={proc.folds}.")
    for fo in (draw.fold_p, draw.fold_u):  # the statistic reads every fold as the same columns of every trial
        counts = torch.zeros(len(fo), proc.folds, dtype=torch.long).scatter_add_(1, fo, torch.ones_like(fo))
        if bool((counts != counts[:1]).any()):
            raise ValueError("every trial needs the same number of rows in each fold (balanced folds, as draw_trials and permutation_draw make them).")
    T, n_p = draw.idx_p.shape
    n, m = n_p + draw.idx_u.shape[1], len(proc.train)
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver '{solver}'; choose one of {', '.join(SOLVERS)}.")
    d = F.shape[1]
    pool_rows = rows_used(draw, len(F)) if solver == "pool" or (solver == "auto" and F.device.type != "cpu") else None
    if solver == "auto":
        # CPU: trial (measured the fastest at every |P|, permutation tests included). Elsewhere
        # pool when every trial uses most of the rows (permutations, null checks on a small
        # reference set: its large products then waste nothing), else trial.
        solver = "pool" if pool_rows is not None and n >= POOL_ALL * pool_rows else "trial"
    if F.device.type == "cpu":
        keep_freed_memory()
    if solver == "trial":  # a chunk's rows and its models' (d+1, d+1) matrices should stay in the cache
        chunk = max(1, TRIAL_CHUNK_ELEMENTS // (n * (d + 1) + 4 * m * (d + 1) ** 2))
        fit_and_score = partial(_fit_and_score_trial, Fa=_standardised_with_ones(F))
    else:
        # Elements per trial of the largest working tensors; the gather solver slows down when its
        # (trials, rows, models, d) tensors leave the cache, so it takes a fifth of the budget.
        per_trial = 8 * m * pool_rows if solver == "pool" else {"local": n * ((d + 1) * (d + 2) // 2 + 8 * m), "gather": 5 * n * (m + 1) * (d + 1)}[solver]
        chunk = max(1, max_elements // per_trial)
        fit_and_score = {"pool": _fit_and_score_pool, "local": partial(_fit_and_score_pool, local=True), "gather": _fit_and_score}[solver]

    with torch.inference_mode(False):  # each chunk writes its rows (draw order, and by fold), also from worker
        scores = torch.empty(T, n, dtype=torch.float64)  # threads, which do not share the caller's inference mode
        by_fold = torch.empty_like(scores)

    def solve(s: int) -> None:
        sub = draw[s : s + chunk]
        sub = TrialDraw(*(v.to(device) for v in (sub.idx_p, sub.idx_u, sub.fold_p, sub.fold_u)))
        sc_, bf_ = fit_and_score(F, sub, proc, C)
        scores[s : s + chunk], by_fold[s : s + chunk] = sc_, bf_

    perm = _relabelings(draw, proc, seed) if proc.fold_permutations else None

    def statistic(sl: slice) -> tuple[Tensor, Tensor, Tensor]:
        """t, p and Cohen's d of the trials in ``sl``."""
        blocks = _fold_blocks(by_fold[sl], draw.fold_p[0], draw.fold_u[0], proc)
        t, p = _statistic(blocks, proc, None if perm is None else (perm[0], perm[1][sl], perm[2][sl]))
        return t, p, cohen_d(torch.cat([a for _, a, _ in blocks], 1), torch.cat([b for _, _, b in blocks], 1))

    starts = range(0, T, chunk)
    threads = torch.get_num_threads()
    if solver == "trial" and F.device.type == "cpu" and threads > 1 and len(starts) > 1:
        # Small chunks (cache-sized) make small products that one thread runs best: the chunks
        # go to `threads` worker threads (torch releases the GIL) with one intra-op thread each;
        # then the statistic, one share of the trials per thread (its many small operations
        # would otherwise run on one).
        from concurrent.futures import ThreadPoolExecutor

        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(threads) as pool:
                list(tqdm(pool.map(solve, starts), total=len(starts), disable=not progress, desc="CDI trials", leave=False))
                share = -(-T // threads)
                t, p, d_ = (torch.cat(v) for v in zip(*pool.map(statistic, [slice(i, i + share) for i in range(0, T, share)])))
        finally:
            torch.set_num_threads(threads)
    else:
        for s in tqdm(starts, disable=not progress, desc="CDI trials", leave=False):
            solve(s)
        t, p, d_ = statistic(slice(None))
    return {"p": p, "t": t, "cohen_d": d_, "sP": scores[:, :n_p], "sU": scores[:, n_p:]}


def rows_used(draw: TrialDraw, n_rows: int) -> int:
    """How many distinct rows of the ``n_rows`` feature rows the trials of ``draw`` use."""
    used = torch.zeros(n_rows, dtype=torch.bool)
    used[draw.idx_p.reshape(-1)] = True
    used[draw.idx_u.reshape(-1)] = True
    return int(used.sum())


def _relabelings(draw: TrialDraw, proc: Procedure, seed: int) -> tuple[dict[int, tuple[Tensor, Tensor]], Tensor, Tensor]:
    """For a procedure with ``fold_permutations``: the labellings of every scored fold (shared
    by the trials; each fold its own), and per trial and fold the labelling its scores are laid
    out on and a tie-breaking uniform, all from ``seed`` (streams of their own: the trials'
    draws use ``seed`` itself, and the relabelings must not depend on them)."""
    B = proc.fold_permutations
    stream = np.random.SeedSequence([seed, 0x5EED]).generate_state(proc.folds + 2)
    relabel = {f: fold_relabelings(int((draw.fold_p[0] == f).sum()), int((draw.fold_u[0] == f).sum()), B, int(stream[f]))
               for f in range(proc.folds) if proc.score[f] >= 0}
    # One stream each: the first trials get the same values whatever the number of trials.
    c = torch.randint(0, B + 1, (len(draw), proc.folds), generator=torch.Generator().manual_seed(int(stream[-2])))
    u = torch.rand(len(draw), proc.folds, generator=torch.Generator().manual_seed(int(stream[-1])), dtype=torch.float64)
    return relabel, c, u


def loop_cdi(members, nonmembers, draw: TrialDraw, k: int = 5, C: float = 1.0, tol: float = 1e-4,
             procedure: str | Procedure = "crossfit", seed: int = 0) -> np.ndarray:
    """The straightforward reference: one sklearn pipeline per trial and model, scipy Welch test
    (or, with ``fold_permutations``, per fold the scores on each relabeling drawn from ``seed``,
    written out with numpy)."""
    proc = procedure if isinstance(procedure, Procedure) else make_procedure(procedure, k)
    F = np.concatenate([np.asarray(members), np.asarray(nonmembers)]).astype(np.float64)
    if proc.fold_permutations:
        relabel, lay, unif = _relabelings(draw, proc, seed)
        relabel = {f: (E.numpy(), place.numpy()) for f, (E, place) in relabel.items()}
    ps = []
    for i in range(draw.idx_p.shape[0]):
        FP, FU = F[draw.idx_p[i].numpy()], F[draw.idx_u[i].numpy()]
        fp, fu = draw.fold_p[i].numpy(), draw.fold_u[i].numpy()
        sP, sU = np.full(len(FP), np.nan), np.full(len(FU), np.nan)
        for j, fs in enumerate(proc.train):
            trp, tru = np.isin(fp, fs), np.isin(fu, fs)
            tep, teu = np.isin(fp, [f for f, mj in enumerate(proc.score) if mj == j]), np.isin(fu, [f for f, mj in enumerate(proc.score) if mj == j])
            X = np.concatenate([FP[trp], FU[tru]])
            y = np.r_[np.ones(trp.sum()), np.zeros(tru.sum())]
            scores = sklearn_fit_score(X, y, np.concatenate([FP[tep], FU[teu]]), C=C, tol=tol)
            sP[tep], sU[teu] = scores[: tep.sum()], scores[tep.sum():]
        if proc.fold_permutations:  # per fold: rank of the observed sum of P scores among the relabelings
            zs = []
            for f, (E, place) in relabel.items():
                a, b = sP[fp == f], sU[fu == f]
                pooled = np.r_[a, b] - np.r_[a, b].mean()
                c = int(lay[i, f])
                v = np.empty_like(pooled)
                v[place[c]] = pooled  # the trial's P scores on labelling c's P positions
                sums = v @ E  # sum of the scores each labelling calls P
                eps = 1e-9 * np.abs(pooled).sum()
                above = int((sums - sums[c] > eps).sum())
                tied = int((np.abs(sums - sums[c]) <= eps).sum()) - 1
                zs.append(sps.norm.isf((above + float(unif[i, f]) * (1 + tied)) / E.shape[1]))
            ps.append(sps.norm.sf(np.sum(zs) / np.sqrt(len(zs))))
        elif proc.per_fold_welch:  # fold-stratified Welch, written out per fold with numpy
            num = var = dfden = 0.0
            for f in range(proc.folds):
                if proc.score[f] < 0:
                    continue
                a, b = sP[fp == f], sU[fu == f]
                s2 = np.var(np.r_[a, b], ddof=1)
                va, vb = np.var(a, ddof=1) / len(a) / s2, np.var(b, ddof=1) / len(b) / s2
                num += (a.mean() - b.mean()) / np.sqrt(s2)
                var += va + vb
                dfden += va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)
            ps.append(sps.t.sf(num / np.sqrt(var), var**2 / dfden))
        else:
            ps.append(sps.ttest_ind(sP[~np.isnan(sP)], sU[~np.isnan(sU)], equal_var=False, alternative="greater").pvalue)
    return np.asarray(ps)


def permutation_test(FP: Tensor, FU: Tensor, permutations: int = 1000, procedure: str | Procedure = "crossfit", k: int = 5,
                     C: float = 1.0, seed: int = 0, device: str | torch.device = "cpu", progress: bool = False) -> dict:
    """Exact permutation p-value of the CDI statistic for one (P, U) case.

    The statistic (the procedure's Welch t) is recomputed, folds and scoring
    models included, on ``permutations`` random relabelings of P u U that keep |P|; then
    p = (1 + #{t_b >= t_obs}) / (1 + B). Under H0 (P and U from one distribution) the labels
    are exchangeable, so P(p <= a) <= a exactly, for any B; the smallest reachable p is
    1 / (1 + B). All relabelings are solved as one batch of trials (:func:`batched_cdi`).
    """
    proc = procedure if isinstance(procedure, Procedure) else make_procedure(procedure, k)
    FP, FU = torch.as_tensor(FP).double(), torch.as_tensor(FU).double()
    draw = permutation_draw(len(FP), len(FU), permutations, proc.folds, seed)
    res = batched_cdi(torch.cat([FP, FU]), FP[:0], draw, proc.folds, C, progress=progress, device=device, procedure=proc, seed=seed)
    t = res["t"]
    exceed = int((t[1:] >= t[0]).sum())
    return {"p": (1 + exceed) / (1 + permutations), "t": float(t[0]), "p_parametric": float(res["p"][0]), "permutations": permutations}


def permutation_draw(n_p: int, n_u: int, permutations: int, k: int, seed: int = 0) -> TrialDraw:
    """The trials of :func:`permutation_test` as row indices into ``cat([P, U])``: trial 0 is
    the observed labelling, trials 1..B random relabelings keeping |P|; fresh balanced folds each."""
    n = n_p + n_u
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(n).unsqueeze(0), torch.rand(permutations, n, generator=g).argsort(-1)])
    fold_p = torch.rand(permutations + 1, n_p, generator=g).argsort(-1) % k
    fold_u = torch.rand(permutations + 1, n_u, generator=g).argsort(-1) % k
    return TrialDraw(labels[:, :n_p], labels[:, n_p:], fold_p, fold_u)


def audit_test(FP: Tensor, FU: Tensor, procedure: str = DEFAULT_PROCEDURE, k: int = 5, C: float = 1.0, seed: int = 0,
               permutations: int = 0, device: str | torch.device = "cpu") -> dict:
    """One data owner's case: the procedure's p-value for P vs U (random balanced folds from
    ``seed``) and, with ``permutations`` > 0, the exact permutation p-value as well."""
    proc = make_procedure(procedure, k)
    FP, FU = torch.as_tensor(FP).double(), torch.as_tensor(FU).double()
    if min(len(FP), len(FU)) < proc.min_set_size:
        raise RSGMError(f"CDI procedure '{proc.name}' needs at least {proc.min_set_size} samples in P and in U, got {len(FP)} and {len(FU)}; add samples or pick another procedure.")
    g = torch.Generator().manual_seed(seed)
    draw = TrialDraw(torch.arange(len(FP)).unsqueeze(0), (len(FP) + torch.arange(len(FU))).unsqueeze(0),
                     (torch.randperm(len(FP), generator=g) % proc.folds).unsqueeze(0), (torch.randperm(len(FU), generator=g) % proc.folds).unsqueeze(0))
    res = batched_cdi(torch.cat([FP, FU]), FP[:0], draw, k, C, device=device, procedure=proc, seed=seed)
    out = {"procedure": proc.name, "p": float(res["p"][0]), "t": float(res["t"][0])}
    if permutations:
        out["p_permutation"] = permutation_test(FP, FU, permutations, proc, k, C, seed + 1, device)["p"]
    return out


def binomial_upper(trials: int, alpha: float, level: float = 0.95) -> int:
    """Largest number of false positives out of ``trials`` null runs that is still inside the
    two-sided ``level`` binomial interval of a test with size ``alpha``."""
    return int(sps.binom.ppf(1 - (1 - level) / 2, trials, alpha))


def null_check(p_null: Tensor, alpha: float, level: float = 0.95) -> dict:
    """False-positive rate of null p-values at ``alpha`` and whether it lies at most at alpha
    within the binomial ``level`` interval (the calibration every audit reports)."""
    trials = int(p_null.numel())
    fp = int((p_null < alpha).sum())
    upper = binomial_upper(trials, alpha, level)
    return {"alpha": alpha, "trials": trials, "false_positives": fp, "false_positive_rate": fp / trials,
            "upper_allowed": upper, "passed": fp <= upper,
            "ks_pvalue": float(sps.kstest(p_null.double().numpy(), "uniform").pvalue)}


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
                 alpha: float = 0.01, progress: bool = True, device: str = "cpu", procedure: str = DEFAULT_PROCEDURE) -> list[dict]:
    """Mean CDI p-value per suspect-set size |P| (|U| = round(u_ratio |P|)), each over
    ``trials`` fresh random subsets; sizes that the pools cannot supply are skipped."""
    proc = make_procedure(procedure, k)
    rows = []
    for n_p in tqdm(sizes, disable=not progress, desc="p-value vs |P|"):
        n_u = max(proc.folds, int(round(u_ratio * n_p)))
        n_bad = int(round(contamination * n_p))
        if n_p - n_bad > len(members) or n_u + n_bad > len(nonmembers) or min(n_p, n_u) < proc.min_set_size:
            continue
        draw = draw_trials(len(members), len(nonmembers), n_p, n_u, trials, proc.folds, contamination, seed + n_p)
        res = batched_cdi(members, nonmembers, draw, k, C, device=device, procedure=proc, seed=seed + n_p)
        n_sp, n_su = _scored_sizes(res)
        power = ttest_power(res["cohen_d"], n_sp, n_su, alpha)
        rows.append({"n_p": n_p, "n_u": n_u, "contamination": contamination, **summarize_pvalues(res["p"]),
                     "reject_rate": float((res["p"] < alpha).double().mean()),
                     "power_tpr": float(power.mean()), "p_values": res["p"]})
    return rows


def _scored_sizes(res: dict) -> tuple[int, int]:
    return int((~torch.isnan(res["sP"][0])).sum()), int((~torch.isnan(res["sU"][0])).sum())


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
                    C: float = 1.0, seed: int = 0, device: str = "cpu", procedure: str = DEFAULT_PROCEDURE,
                    n_u: int | None = None, progress: bool = False) -> dict:
    """False-positive check: P and U both drawn (disjointly) from non-members. The rejection
    rate at ``alpha`` must stay at most alpha within its binomial interval (:func:`null_check`)."""
    proc = make_procedure(procedure, k)
    empty = torch.zeros(0, nonmembers.shape[1], dtype=torch.float64)
    n_u = n_p if n_u is None else n_u
    if min(n_p, n_u) < proc.min_set_size:
        raise RSGMError(f"the null check of procedure '{proc.name}' needs at least {2 * proc.min_set_size} reference samples "
                        f"(|P'| and |U'| >= {proc.min_set_size}); got |P'| = {n_p}, |U'| = {n_u}: add reference samples.")
    draw = draw_trials(0, len(nonmembers), n_p, n_u, trials, proc.folds, contamination=1.0, seed=seed)
    res = batched_cdi(empty, nonmembers, draw, k, C, device=device, procedure=proc, progress=progress, seed=seed)
    return {"n_p": n_p, "n_u": n_u, "trials": trials, **summarize_pvalues(res["p"]),
            "false_positive_rate": float((res["p"] < alpha).double().mean()), "p_values": res["p"]}


def pvalue_to_tpr(p_member: Tensor, p_null: Tensor, alpha: float = 0.01) -> float:
    """Empirical TPR@FPR=alpha of the test: ROC of ``1 - p`` over member runs (positives) vs
    null runs (negatives)."""
    from rsgm.metrics.membership import tpr_at_fpr

    scores = torch.cat([1 - p_member.double(), 1 - p_null.double()])
    labels = torch.cat([torch.ones(len(p_member)), torch.zeros(len(p_null))])
    return float(tpr_at_fpr(scores, labels, alpha))
