"""Dataset inference for image autoregressive models (methods_spec §6.6).

The "optimised procedure": every MIA feature (oriented higher = member) of the samples in
P and U; NaN -> 0; a MinMaxScaler fitted on the union P u U maps each feature to [0, 1];
the score of a sample is the sum of its scaled features; a one-sided Welch test asks
whether P scores higher than U. No classifier is trained, so no samples are spent on a
control split. The LLM-DI baseline (Maini et al.) instead aggregates the features with a
linear scorer; here that is the cross-fitted StandardScaler + logistic regression of
:func:`rsgm.privacy.stats.batched_cdi`.

A suspect-set size |P| is "enough" when the mean p-value over ``trials`` random subsets is
<= alpha; the reported P is the smallest such size on the grid. The test is one-sided, so a
P that scores *lower* than U (a result in the wrong direction) yields p near 1, never success.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats as sps
from torch import Tensor
from tqdm.auto import tqdm

from rsgm.privacy import stats as S


def size_grid(max_size: int) -> list[int]:
    """2..10, 20..100 step 10, 200..1000 step 100, 2000..10000 step 1000, up to ``max_size``."""
    grid = list(range(2, 11)) + list(range(20, 101, 10)) + list(range(200, 1001, 100)) + list(range(2000, 10001, 1000))
    return [n for n in grid if n <= max_size]


def minmax_sum(X: Tensor, n_p: int) -> tuple[Tensor, Tensor]:
    """Scores of P and U for a batch of trials: X (T, n_p + n_u, d) raw features, rows of P
    first. NaN -> 0, min/max over the union per trial and feature (a constant feature scales
    to 0, as sklearn's MinMaxScaler), sum over features. Returns (T, n_p) and (T, n_u)."""
    X = torch.nan_to_num(X.double(), nan=0.0)
    lo, hi = X.amin(1, keepdim=True), X.amax(1, keepdim=True)
    rng = hi - lo
    Z = torch.where(rng > 0, (X - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.zeros_like(X))
    s = Z.sum(-1)
    return s[:, :n_p], s[:, n_p:]


def sum_di_pvalues(members: Tensor, nonmembers: Tensor, draw: S.TrialDraw, chunk: int = 250) -> Tensor:
    """p-value of every trial of ``draw`` under the optimised procedure (batched)."""
    Fm = torch.cat([torch.as_tensor(members), torch.as_tensor(nonmembers)]).double()
    ps = []
    n_p = draw.idx_p.shape[1]
    for a in range(0, draw.idx_p.shape[0], chunk):
        idx = torch.cat([draw.idx_p[a:a + chunk], draw.idx_u[a:a + chunk]], 1)
        sP, sU = minmax_sum(Fm[idx], n_p)
        ps.append(S.welch_t_test(sP, sU)[2])
    return torch.cat(ps)


def loop_sum_di(members, nonmembers, draw: S.TrialDraw) -> np.ndarray:
    """The straightforward reference: sklearn MinMaxScaler per trial, scipy's Welch test."""
    from sklearn.preprocessing import MinMaxScaler

    F = np.nan_to_num(np.concatenate([np.asarray(members), np.asarray(nonmembers)]).astype(np.float64), nan=0.0)
    out = []
    for i in range(draw.idx_p.shape[0]):
        FP, FU = F[draw.idx_p[i].numpy()], F[draw.idx_u[i].numpy()]
        Z = MinMaxScaler().fit_transform(np.r_[FP, FU]).sum(1)
        out.append(sps.ttest_ind(Z[: len(FP)], Z[len(FP):], equal_var=False, alternative="greater").pvalue)
    return np.asarray(out)


def linear_di_pvalues(members: Tensor, nonmembers: Tensor, draw: S.TrialDraw, k: int = 5) -> Tensor:
    """LLM-DI baseline: a linear scorer (StandardScaler + logistic regression, k-fold
    cross-fitted so every sample is scored by a model that did not see it) + Welch test."""
    F = torch.nan_to_num(torch.cat([torch.as_tensor(members), torch.as_tensor(nonmembers)]).double(), nan=0.0)
    m = len(members)
    return S.batched_cdi(F[:m], F[m:], draw, k=k)["p"]


METHODS = {"sum": sum_di_pvalues, "linear": linear_di_pvalues}


def min_suspect_size(members: Tensor, nonmembers: Tensor, method: str = "sum", sizes: list[int] | None = None,
                     trials: int = 1000, alpha: float = 0.01, seed: int = 0, progress: bool = False) -> tuple[int | None, list[dict]]:
    """Walk the |P| grid (|U| = |P|) upwards; stop at the first size whose mean p <= alpha.
    Returns ``(min |P| or None, rows)``; sizes the pools cannot supply are not tried."""
    fn = METHODS[method]
    k = 5 if method == "linear" else 1
    cap = min(len(members), len(nonmembers))
    sizes = [n for n in (sizes or size_grid(cap)) if n <= cap and (method != "linear" or n >= k)]
    rows = []
    for n in tqdm(sizes, disable=not progress, desc=f"DI ({method})", leave=False):
        draw = S.draw_trials(len(members), len(nonmembers), n, n, trials, k, 0.0, seed + n)
        p = fn(members, nonmembers, draw)
        rows.append({"n_p": n, "mean_p": float(p.mean()), "reject_rate": float((p <= alpha).double().mean())})
        if rows[-1]["mean_p"] <= alpha:
            return n, rows
    return None, rows


def null_false_positive_rate(nonmembers: Tensor, n_p: int, trials: int = 1000, alpha: float = 0.01,
                             method: str = "sum", seed: int = 0) -> dict:
    """The null experiment: P and U both drawn (disjointly) from non-members; the share of
    trials with p <= alpha must stay near alpha (binomial interval over ``trials``)."""
    empty = torch.zeros(0, nonmembers.shape[1], dtype=torch.float64)
    k = 5 if method == "linear" else 1
    draw = S.draw_trials(0, len(nonmembers), n_p, n_p, trials, k, contamination=1.0, seed=seed)
    p = METHODS[method](empty, nonmembers, draw)
    fpr = float((p <= alpha).double().mean())
    ci = sps.binomtest(int(round(fpr * trials)), trials, alpha).proportion_ci(0.95)
    return {"n_p": n_p, "trials": trials, "false_positive_rate": fpr, "ci_low": ci.low, "ci_high": ci.high, "p_values": p}
