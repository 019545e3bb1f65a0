"""Construction and assessment of LAION-mi (thesis §7.5, methods_spec §4.2) on embeddings.

* :func:`nearest_distances`: exact nearest neighbour (L2) of every query among the keys by
  batched matrix products, ||q - k||^2 = ||q||^2 + ||k||^2 - 2 q.k, keeping a running minimum
  over key blocks. Cost: 2 * N_q * N_k * d multiply-adds and O(block_q * block_k) memory,
  so the full tables (26,874 x 13,396, d = 768) are 0.55 TFLOP: seconds on one CPU core
  group or one GPU; a 160k-candidate x 1M-member screen is 250 TFLOP, minutes on one GPU.
* :func:`deduplicate`: a non-member whose nearest member (CLIP image embeddings,
  unit-normalised) is closer than 0.5 is dropped as a duplicate.
* :func:`sanitise`: Algorithm 1 on CLIP text embeddings: classifiers F_1..F_n, each trained
  on the previous iteration's kept members against the non-members; a member is kept only
  if every classifier so far predicts "non-member".
* :func:`frechet_distance`, :func:`assess`: FID of embeddings within and between the sets,
  a 2-D PCA and a classifier's cross-validated accuracy at telling the sets apart.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def nearest_distances(queries, keys, normalize: bool = True, block_q: int = 8192, block_k: int = 65536,
                      device: str | None = None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(N_q,) exact L2 distance from each query to its nearest key, and that key's index."""
    q_all = torch.as_tensor(queries, dtype=dtype)
    k_all = torch.as_tensor(keys, dtype=dtype)
    if normalize:
        q_all, k_all = _unit(q_all), _unit(k_all)
    dev = torch.device(device) if device else q_all.device
    best = torch.full((len(q_all),), float("inf"), dtype=dtype)
    arg = torch.zeros(len(q_all), dtype=torch.long)
    for s in range(0, len(q_all), block_q):
        q = q_all[s: s + block_q].to(dev)
        qn = q.pow(2).sum(1, keepdim=True)
        bd = torch.full((len(q),), float("inf"), dtype=dtype, device=dev)
        ba = torch.zeros(len(q), dtype=torch.long, device=dev)
        for t in range(0, len(k_all), block_k):
            k = k_all[t: t + block_k].to(dev)
            d2 = (qn + k.pow(2).sum(1) - 2 * q @ k.T).clamp_min(0)
            m, a = d2.min(1)
            better = m < bd
            bd, ba = torch.where(better, m, bd), torch.where(better, a + t, ba)
        best[s: s + block_q], arg[s: s + block_q] = bd.sqrt().cpu(), ba.cpu()
    return best, arg


def deduplicate(nonmember_emb, member_emb, threshold: float = 0.5, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Keep mask over the non-members (nearest member at distance >= threshold) and the distances."""
    d, _ = nearest_distances(nonmember_emb, member_emb, **kwargs)
    d = d.numpy()
    return d >= threshold, d


def _classifier(seed: int, C: float = 1.0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))


def sanitise(member_pool, nonmembers, iterations: int = 3, batch_size: int = 10000, seed: int = 0, C: float = 1.0,
             make_classifier=None) -> tuple[np.ndarray, list]:
    """Algorithm 1. Returns (indices into ``member_pool`` of the sanitised members, the
    classifiers). Each iteration screens fresh random batches of the pool until it keeps
    |NM| members; raises when the pool runs out first."""
    M, NM = np.asarray(member_pool), np.asarray(nonmembers)
    n = len(NM)
    rng = np.random.default_rng(seed)
    make = make_classifier or (lambda i: _classifier(seed + i, C))
    classifiers, kept = [], None
    for i in range(iterations):
        train = M[rng.choice(len(M), n, replace=False)] if i == 0 else M[kept]
        clf = make(i).fit(np.concatenate([train, NM]), np.r_[np.ones(len(train)), np.zeros(n)])
        classifiers.append(clf)
        order, found = rng.permutation(len(M)), []
        for s in range(0, len(M), batch_size):
            S = order[s: s + batch_size]
            ok = np.ones(len(S), dtype=bool)
            for f in classifiers:
                ok &= f.predict(M[S]) == 0
            found.append(S[ok])
            if sum(len(x) for x in found) >= n:
                break
        found = np.concatenate(found)
        if len(found) < n:
            raise ValueError(f"sanitisation iteration {i + 1} kept {len(found)} of {len(M)} pool members, fewer than the {n} non-members: use a larger member pool.")
        kept = found[:n]
    return kept, classifiers


def frechet_distance(a, b) -> float:
    """FID between Gaussians fitted to two embedding sets: ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(sa @ sb, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: the usual epsilon on the diagonal
        eps = 1e-6 * np.eye(len(sa))
        covmean = linalg.sqrtm((sa + eps) @ (sb + eps))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa + sb - 2 * covmean.real))


def assess(members, nonmembers, n: int | None = 10000, seed: int = 0) -> dict:
    """Distribution match of two embedding sets: internal FIDs (two random halves of each
    set), the comparative FID (half vs half), a 5-fold cross-validated logistic regression's
    balanced accuracy at telling them apart, and 2-D PCA coordinates of both sets."""
    from sklearn.decomposition import PCA
    from sklearn.model_selection import cross_val_score

    rng = np.random.default_rng(seed)
    M, N = np.asarray(members, dtype=np.float64), np.asarray(nonmembers, dtype=np.float64)
    k = min(len(M), len(N), 2 * (n or max(len(M), len(N))) ) // 2 * 2
    M, N = M[rng.choice(len(M), k, replace=False)], N[rng.choice(len(N), k, replace=False)]
    h = k // 2
    X, y = np.concatenate([M, N]), np.r_[np.ones(k), np.zeros(k)]
    acc = cross_val_score(_classifier(seed), X, y, cv=5, scoring="balanced_accuracy")
    pca = PCA(2, random_state=seed).fit(X)
    return {"n_per_set": k, "fid_members_internal": frechet_distance(M[:h], M[h:]),
            "fid_nonmembers_internal": frechet_distance(N[:h], N[h:]), "fid_comparative": frechet_distance(M[:h], N[:h]),
            "classifier_accuracy": float(acc.mean()), "classifier_accuracy_std": float(acc.std()),
            "pca_members": pca.transform(M), "pca_nonmembers": pca.transform(N)}
