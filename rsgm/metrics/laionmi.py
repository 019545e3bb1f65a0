"""LAION-mi evaluation (methods_spec §4.4, §4.6, §4.7): threshold and classifier attacks
over random balanced evaluation subsets, reported as mean +- std of TPR@FPR=1 % and AUC.

* Threshold attack: score = -signal (predict "member" when the signal is below tau); one
  score column per (method, signal, step). The table reports, per (method, signal), the
  step with the best mean TPR over the subsets ([INTERP] of the thesis' tables; choosing
  the step on the same subsets is optimistic by the max over a method's steps, which on
  chance-level signals shows up as a mean TPR a little above 1 %).
* Classifier attack (App. B.4.2): fit k trains on a balanced draw from the attack set
  outside evaluation subset k and is evaluated on subset k. Models: logistic regression,
  decision tree, random forest (each tuned by 5-fold grid search inside every fit, grids
  of Table B.4.1) and the 3-layer MLP (hidden 10, ReLU, sigmoid, BCE, Adam 1e-3, batch 32,
  100 epochs, early stopping on a 10 % validation split, best epoch kept). Inputs are
  standardised on the training set.

The column-wise TPR@FPR is the exact definition of :func:`rsgm.metrics.membership.tpr_at_fpr`
(largest TPR over ROC points with FPR <= a), vectorised over columns.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

GRIDS = {
    "lr": {"clf__C": [0.01, 0.1, 1, 10, 100]},
    "dtc": {"clf__max_depth": [2, 8, 16], "clf__min_samples_split": [2, 8, 16]},
    "rfc": {"clf__n_estimators": [10, 100, 1000], "clf__max_depth": [2, 8, 16]},
}


def tpr_at_fpr_columns(scores: np.ndarray, is_member: np.ndarray, fpr: float = 0.01) -> np.ndarray:
    """(C,) TPR@FPR of every column of ``scores`` (n, C), higher = member.

    With k = floor(fpr * n_neg), the best admissible threshold sits just above the
    (k+1)-th largest non-member score v; the TPR is the fraction of members above v."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[:, None] if s.ndim == 1 else s
    y = np.asarray(is_member).astype(bool)
    neg = -np.sort(-s[~y], axis=0)  # descending per column
    k = int(np.floor(fpr * neg.shape[0] + 1e-9))
    if k >= neg.shape[0]:
        return np.ones(s.shape[1])
    v = neg[k]
    return (s[y] > v).mean(0)


def auc_columns(scores: np.ndarray, is_member: np.ndarray) -> np.ndarray:
    """(C,) ROC-AUC per column by the rank-sum (Mann-Whitney) formula; ties count one half."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[:, None] if s.ndim == 1 else s
    y = np.asarray(is_member).astype(bool)
    r = rankdata(s, axis=0)
    n1, n0 = y.sum(), (~y).sum()
    return (r[y].sum(0) - n1 * (n1 + 1) / 2) / (n1 * n0)


def subset_metrics(scores: np.ndarray, is_member: np.ndarray, subsets: list[np.ndarray], fpr: float = 0.01) -> dict[str, np.ndarray]:
    """TPR@FPR and AUC of every column on every subset: arrays (n_subsets, C)."""
    y = np.asarray(is_member).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    s = s[:, None] if s.ndim == 1 else s
    tpr = np.stack([tpr_at_fpr_columns(s[idx], y[idx], fpr) for idx in subsets])
    auc = np.stack([auc_columns(s[idx], y[idx]) for idx in subsets])
    return {"tpr": tpr, "auc": auc}


def threshold_table(names: list[str], signals: np.ndarray, is_member: np.ndarray, subsets: list[np.ndarray],
                    fpr: float = 0.01) -> tuple[list[dict], list[dict]]:
    """Threshold attacks on columns named ``method/signal/step`` (raw signals, lower = member).

    Returns (best-step rows per (method, signal), per-step rows); columns that are NaN for
    every sample (signals a method does not produce) are skipped."""
    sig = np.asarray(signals, dtype=np.float64)
    keep = [j for j in range(sig.shape[1]) if not np.isnan(sig[:, j]).all()]
    m = subset_metrics(-sig[:, keep], is_member, subsets, fpr)
    per_step = []
    for c, j in enumerate(keep):
        method, signal, step = names[j].split("/")
        per_step.append({"method": method, "signal": signal, "step": step,
                         "tpr_mean": m["tpr"][:, c].mean(), "tpr_std": m["tpr"][:, c].std(),
                         "auc_mean": m["auc"][:, c].mean(), "auc_std": m["auc"][:, c].std()})
    best: dict[tuple[str, str], dict] = {}
    for r in per_step:
        key = (r["method"], r["signal"])
        if key not in best or r["tpr_mean"] > best[key]["tpr_mean"]:
            best[key] = r
    return list(best.values()), per_step


def _mlp_scores(Xtr, ytr, Xte, seed: int, epochs: int = 100, batch: int = 32, patience: int = 10) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    d = Xtr.shape[1]
    net = torch.nn.Sequential(torch.nn.Linear(d, 10), torch.nn.ReLU(), torch.nn.Linear(10, 10), torch.nn.ReLU(), torch.nn.Linear(10, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    perm = torch.randperm(len(Xtr), generator=g)
    n_val = max(1, len(Xtr) // 10)
    X, Y = torch.as_tensor(Xtr, dtype=torch.float32), torch.as_tensor(ytr, dtype=torch.float32)
    Xv, Yv, Xt, Yt = X[perm[:n_val]], Y[perm[:n_val]], X[perm[n_val:]], Y[perm[n_val:]]
    bce = torch.nn.BCEWithLogitsLoss()  # sigmoid output + BCE, in the numerically stable form
    best, best_state, bad = float("inf"), None, 0
    for _ in range(epochs):
        order = torch.randperm(len(Xt), generator=g)
        for s in range(0, len(Xt), batch):
            i = order[s: s + batch]
            opt.zero_grad()
            bce(net(Xt[i]).squeeze(1), Yt[i]).backward()
            opt.step()
        with torch.no_grad():
            v = float(bce(net(Xv).squeeze(1), Yv))
        if v < best - 1e-6:
            best, best_state, bad = v, {k: t.clone() for k, t in net.state_dict().items()}, 0
        else:
            bad += 1
            if bad >= patience:
                break
    net.load_state_dict(best_state)
    with torch.no_grad():
        return torch.sigmoid(net(torch.as_tensor(Xte, dtype=torch.float32)).squeeze(1)).numpy()


def classifier_scores(kind: str, Xtr, ytr, Xte, seed: int = 0, grids: dict | None = None, cv: int = 5) -> np.ndarray:
    """Membership probability of ``Xte`` from a classifier fitted on (Xtr, ytr)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    if kind == "nn":
        sc = StandardScaler().fit(Xtr)
        return _mlp_scores(sc.transform(Xtr), ytr, sc.transform(Xte), seed)
    est = {"lr": LogisticRegression(max_iter=1000), "dtc": DecisionTreeClassifier(random_state=seed),
           "rfc": RandomForestClassifier(random_state=seed)}[kind]
    pipe = Pipeline([("scale", StandardScaler()), ("clf", est)])
    cv = min(cv, int(np.bincount(np.asarray(ytr, dtype=int)).min()))  # tiny training sets: fewer folds
    search = GridSearchCV(pipe, (grids or GRIDS)[kind], cv=cv, scoring="roc_auc")
    return search.fit(Xtr, ytr).predict_proba(Xte)[:, 1]


def classifier_attack(features: np.ndarray, is_member: np.ndarray, subsets: list[np.ndarray], kinds: list[str],
                      train_per_class: int | None = None, fpr: float = 0.01, seed: int = 0,
                      grids: dict | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Fit k (one per subset) trains on ``train_per_class`` members and as many non-members
    outside subset k (None: as many as the smaller class allows) and scores subset k.
    Returns ``{kind: {"tpr": (n_fits,), "auc": (n_fits,)}}``."""
    X = np.asarray(features, dtype=np.float64)
    X = X[:, ~np.isnan(X).any(0)]
    y = np.asarray(is_member).astype(int)
    rng = np.random.default_rng(seed)
    out = {k: {"tpr": [], "auc": []} for k in kinds}
    for f, idx in enumerate(subsets):
        rest = np.setdiff1d(np.arange(len(y)), idx)
        pos, neg = rest[y[rest] == 1], rest[y[rest] == 0]
        n = min(len(pos), len(neg), train_per_class or len(rest))
        tr = np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)])
        for k in kinds:
            s = classifier_scores(k, X[tr], y[tr], X[idx], seed + f, grids)
            out[k]["tpr"].append(tpr_at_fpr_columns(s, y[idx], fpr)[0])
            out[k]["auc"].append(auc_columns(s, y[idx])[0])
    return {k: {m: np.asarray(v) for m, v in d.items()} for k, d in out.items()}
