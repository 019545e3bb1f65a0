"""CDI's evaluation studies beyond the main p-value curve (thesis ch. 8, App. C), on feature
matrices, model-agnostic; the p-values come from :mod:`rsgm.privacy.stats`.

* :func:`set_level_mia` — Table 8.5.1 "set-level MIA (no t-test)": a set's score is the
  **maximum** per-sample membership score in it; TPR@FPR over 1000 member sets (positives)
  against 1000 non-member sets (negatives). With ``calibrate`` the threshold is also fixed on
  separate non-member sets and its false-positive rate measured on fresh ones.
* :func:`mia_on_di` — App. C.19: the same max rule for each single MIA (score = -feature)
  over several |P|, to be compared with CDI's ROC.
* :func:`cdi_alpha_roc` — App. C.18: CDI's ROC from sweeping alpha over [0, 1]:
  TPR(alpha) = share of member trials with p < alpha; FPR(alpha) = alpha (nominal, as the
  thesis plots it) and the share of null trials with p < alpha (measured).
* :func:`imbalance_study` — Table C.12.1: min |P| with |U| = ratio x |P|.
* :func:`ablation_sets` — Fig. 8.5.2: feature subsets from a short spec (singles, pairs,
  triples of {existing MIAs as one unit, each new group}, single existing features, any
  ``a+b+c``, ``all``, ``all_gray_box``).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import Tensor

from rsgm.errors import RSGMError
from rsgm.metrics.membership import membership_auc, membership_roc, tpr_at_fpr
from rsgm.privacy import stats as S

EXISTING_GROUPS = ("dl", "secmi", "pia", "pian")


def _group(name: str) -> str:
    return name.split("_")[0]


# --------------------------------------------------------------------------- set-level scores


def set_max_scores(scores: Tensor, set_size: int, n_sets: int, seed: int) -> Tensor:
    """Maximum score of ``n_sets`` random subsets of ``set_size`` distinct rows each."""
    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    if set_size > len(scores):
        raise RSGMError(f"a set of {set_size} samples cannot be drawn from {len(scores)}; lower the set size.")
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n_sets, len(scores), generator=g).argsort(-1)[:, :set_size]
    return scores[idx].amax(1)


def threshold_at_fpr(negative: Tensor, fpr: float) -> float:
    """Threshold from calibration negatives such that a fresh negative exceeds it with
    probability at most ``fpr`` (exchangeable, continuous scores): the k-th smallest, with
    k = ceil((n + 1)(1 - fpr)) (the split-conformal rank; +inf when k > n)."""
    neg = torch.sort(torch.as_tensor(negative, dtype=torch.float64)).values
    k = int(np.ceil((len(neg) + 1) * (1 - fpr) - 1e-9))
    return float("inf") if k > len(neg) else float(neg[k - 1])


def set_level_mia(member_scores: Tensor, nonmember_scores: Tensor, set_size: int, n_sets: int = 1000,
                  fpr: float = 0.01, seed: int = 0, calibrate: bool = True) -> dict:
    """Table 8.5.1's baseline: set score = max per-sample score (higher = member).

    Returns TPR@FPR and AUC of the set scores (``n_sets`` member sets vs ``n_sets`` non-member
    sets, exact ROC), and with ``calibrate`` a deployable rule: the threshold at FPR ``fpr`` on
    ``n_sets`` calibration non-member sets (:func:`threshold_at_fpr`), then its TPR and
    measured FPR on the evaluation sets, and whether that FPR is inside the binomial 95 %
    interval of ``fpr`` (approximate: the threshold's own sampling spread adds to it).

    The guarantee holds for sets resampled from the same non-member pool (exchangeable with
    the calibration sets). A set's max depends on the pool's few extreme samples, so on a
    different pool the rule's FPR varies widely (docs/cdi.md: 0 to 9.4 % over 20 half-splits
    of 1500 null scores); this baseline has no p-value and no null check."""
    pos = set_max_scores(member_scores, set_size, n_sets, seed)
    neg = set_max_scores(nonmember_scores, set_size, n_sets, seed + 1)
    s = torch.cat([pos, neg])
    y = torch.cat([torch.ones(n_sets), torch.zeros(n_sets)])
    out = {"set_size": set_size, "n_sets": n_sets, "tpr_at_fpr": float(tpr_at_fpr(s, y, fpr)), "auc": float(membership_auc(s, y))}
    if calibrate:
        thr = threshold_at_fpr(set_max_scores(nonmember_scores, set_size, n_sets, seed + 2), fpr)
        fp = int((neg > thr).sum())
        out.update({"threshold": thr, "calibrated_tpr": float((pos > thr).double().mean()), "calibrated_fpr": fp / n_sets,
                    "calibrated_fpr_within": fp <= S.binomial_upper(n_sets, fpr)})
    return out


def crossfit_scores(members: Tensor, nonmembers: Tensor, k: int = 5, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The CDI scoring model's membership score of every sample (logistic-regression logit,
    k-fold cross-fitted over all members vs all non-members, so no sample scores itself)."""
    sP, sU = S.cross_fit_scores(np.asarray(members, dtype=np.float64), np.asarray(nonmembers, dtype=np.float64), k=k, seed=seed)
    return torch.from_numpy(sP), torch.from_numpy(sU)


def mia_on_di(names: list[str], members: Tensor, nonmembers: Tensor, set_sizes: list[int], n_sets: int = 1000,
              fpr: float = 0.01, seed: int = 0, features: list[str] | None = None) -> list[dict]:
    """App. C.19: each single MIA flags a suspect set when any sample's score (-feature)
    passes the threshold, i.e. its set score is the max; ROC over 1000 member-only vs 1000
    non-member-only sets per |P|. ``features``: column names (default: the existing MIAs)."""
    features = [n for n in names if _group(n) in EXISTING_GROUPS] if features is None else features
    rows = []
    for name in features:
        if name not in names:
            raise RSGMError(f"MIA-on-DI feature '{name}' is not among the extracted features {names}.")
        j = names.index(name)
        for n in set_sizes:
            if n > min(len(members), len(nonmembers)):
                continue
            r = set_level_mia(-members[:, j], -nonmembers[:, j], n, n_sets, fpr, seed + n, calibrate=False)
            rows.append({"method": name, **r})
    return rows


def cdi_alpha_roc(p_member: Tensor, p_null: Tensor, alphas: list[float] | None = None) -> list[dict]:
    """App. C.18: per alpha, TPR = P(p < alpha | members in P), nominal FPR = alpha and the
    measured FPR = P(p < alpha | P and U non-members)."""
    alphas = list(np.linspace(0, 1, 101)) if alphas is None else alphas
    pm, pn = torch.as_tensor(p_member).double(), torch.as_tensor(p_null).double()
    return [{"alpha": float(a), "tpr": float((pm < a).double().mean()), "fpr_measured": float((pn < a).double().mean())} for a in alphas]


def roc_auc_from_points(fpr: list[float], tpr: list[float]) -> float:
    """Area under a ROC given as points (sorted by FPR, closed at (0, 0) and (1, 1))."""
    f = np.r_[0.0, np.asarray(fpr, float), 1.0]
    t = np.r_[0.0, np.asarray(tpr, float), 1.0]
    order = np.lexsort((t, f))
    return float(np.trapezoid(t[order], f[order]))


def pvalue_roc(p_member: Tensor, p_null: Tensor) -> tuple[Tensor, Tensor]:
    """CDI's exact empirical ROC over all alphas (score 1 - p; member runs vs null runs)."""
    s = torch.cat([1 - p_member.double(), 1 - p_null.double()])
    y = torch.cat([torch.ones(len(p_member)), torch.zeros(len(p_null))])
    fpr, tpr, _ = membership_roc(s, y)
    return fpr, tpr


# --------------------------------------------------------------------------- min |P| studies


def search_min_size(members, nonmembers, sizes, trials, k, C, alpha, seed, device, procedure, u_ratio: float = 1.0) -> tuple[int | None, list[dict]]:
    """Walk the |P| grid upwards and stop at the first size with mean p < alpha."""
    rows: list[dict] = []
    for n in sizes:
        rows += S.pvalue_curve(members, nonmembers, [n], trials=trials, k=k, C=C, seed=seed, alpha=alpha, progress=False,
                               device=device, procedure=procedure, u_ratio=u_ratio)
        if rows and rows[-1]["n_p"] == n and rows[-1]["mean_p"] < alpha:
            return n, rows
    return None, rows


def imbalance_study(members, nonmembers, ratios: list[float], sizes: list[int], trials: int = 1000, k: int = 5,
                    C: float = 1.0, alpha: float = 0.01, seed: int = 0, device: str = "cpu",
                    procedure: str = S.DEFAULT_PROCEDURE) -> list[dict]:
    """Table C.12.1: min |P| (mean p < alpha) with |U| = round(ratio |P|), per ratio."""
    out = []
    for r in ratios:
        if r <= 0:
            raise RSGMError(f"|U|/|P| ratios must be positive, got {r}.")
        n, rows = search_min_size(members, nonmembers, sizes, trials, k, C, alpha, seed, device, procedure, u_ratio=r)
        last = rows[-1] if rows else None
        out.append({"u_ratio": r, "min_P": n, "n_u_at_min_P": last["n_u"] if n else None,
                    "largest_P_tried": last["n_p"] if last else None, "mean_p_at_largest": last["mean_p"] if last else None})
    return out


# --------------------------------------------------------------------------- feature-set ablation


def ablation_sets(names: list[str], spec: list[str] | None = None, existing_groups=EXISTING_GROUPS,
                  access: dict[str, str] | None = None) -> list[tuple[str, list[int]]]:
    """Feature subsets for Fig. 8.5.2 as (label, column indices).

    Units are "existing" (the prior-work groups jointly, as in the figure) and each other
    feature group. Spec entries: ``singles`` (each unit alone), ``existing_singles`` (each
    prior-work group alone), ``pairs`` / ``triples`` (all combinations of 2 / 3 units),
    ``all``, ``all_gray_box``, ``existing+each`` (existing plus each new group), or an explicit
    ``a+b+...`` of units or groups. Default: the figure's left and right columns plus
    existing+each: ``[singles, existing+each, all, all_gray_box]``."""
    groups = list(dict.fromkeys(_group(n) for n in names))
    existing = [g for g in groups if g in existing_groups]
    new = [g for g in groups if g not in existing_groups]
    units = (["existing"] if existing else []) + new
    spec = ["singles", "existing+each", "all", "all_gray_box"] if spec is None else spec

    def cols(parts) -> list[int]:
        gs = set()
        for p in parts:
            if p == "existing":
                gs |= set(existing)
            elif p in groups:
                gs.add(p)
            else:
                raise RSGMError(f"ablation feature set names '{p}', which is neither 'existing' nor an extracted group {groups}.")
        return [j for j, n in enumerate(names) if _group(n) in gs]

    combos: list[tuple[str, ...]] = []
    out: list[tuple[str, list[int]]] = []
    for entry in spec:
        if entry == "singles":
            combos += [(u,) for u in units]
        elif entry == "existing_singles":
            combos += [(g,) for g in existing]
        elif entry in ("pairs", "triples"):
            combos += list(itertools.combinations(units, 2 if entry == "pairs" else 3))
        elif entry == "existing+each":
            combos += [("existing", g) for g in new] if existing else []
        elif entry == "all":
            combos.append(("all",))
        elif entry == "all_gray_box":
            gray = [j for j, n in enumerate(names) if (access or {}).get(n, "gray") == "gray"]
            if 0 < len(gray) < len(names):
                out.append(("all_gray_box", gray))
        else:
            combos.append(tuple(entry.split("+")))
    seen = {label for label, _ in out}
    result = []
    for c in combos:
        label = "+".join(c)
        if label in seen:
            continue
        seen.add(label)
        result.append((label, list(range(len(names))) if c == ("all",) else cols(c)))
    return result + out
