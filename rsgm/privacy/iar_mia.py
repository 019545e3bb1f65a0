"""Membership-inference scores for image autoregressive models (methods_spec §6.2-6.4).

Every score here is per image and oriented so that **higher means member**. Inputs are the
per-token outputs of one teacher-forced pass:

* token models: ``logits`` (B, N, V) and the true ``tokens`` (B, N); the CFG ("tailored")
  variant passes ``logits_cond - logits_null`` in place of the logits (§6.3), and the same
  softmax / cross-entropy code runs on it;
* MAR-style models: ``ell`` (B, N) = minus the per-token diffusion loss (NaN where a token
  was not scored); the CFG variant uses ``loss_null - loss_cond``. Hinge, min-k%++ and SURP
  need a vocabulary and do not apply.

Notation: ell_n = log p_n(t_n), p_n the softmax of the logits at position n.

* loss:      (1/N) sum_n ell_n                               (minus the mean cross-entropy)
* zlib:      -(mean NLL) / zlib(token bytes)                  (Carlini et al.)
* hinge:     (1/N) sum_n [ell_n - max_{v != t_n} log p_n(v)]
* min-k%:    mean of the k % lowest ell_n
* min-k%++:  mean of the k % lowest z_n = (ell_n - mu_n) / sigma_n, mu_n = E_{p_n}[log p_n],
             sigma_n = sqrt(Var_{p_n}[log p_n])  (the standard deviation, not the variance)
* SURP:      mean ell_n over S = {n : H(p_n) < eps_e and ell_n <= tau_k}, tau_k the k-th
             percentile of the image's own ell (so S is never empty before the entropy filter)
* CAMIA:     (i) mean ell_n over tokens below the image's mean ell; (ii) mean ell_n over tokens
             below the running mean of the preceding tokens; (iii) the least-squares slope of
             ell_n over positions (methods_spec §6.2, the §9.3.1 three-signal version).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

KS = (0.1, 0.2, 0.3, 0.4, 0.5)
SURP_ENTROPIES = (2.0, 4.0, 8.0, 16.0)


# --------------------------------------------------------------------------- helpers


def _lowest_k_mean(values: Tensor, k: float) -> Tensor:
    """Row-wise mean of the ``max(1, floor(k * n_valid))`` smallest finite entries (NaN = absent)."""
    v = values.double()
    valid = ~torch.isnan(v)
    n_valid = valid.sum(-1)
    srt = torch.where(valid, v, torch.full_like(v, float("inf"))).sort(-1).values
    n_k = (k * n_valid).floor().clamp(min=1).long()
    take = torch.arange(v.shape[-1], device=v.device) < n_k.unsqueeze(-1)
    out = torch.where(take, srt, torch.zeros_like(srt)).sum(-1) / n_k
    return torch.where(n_valid > 0, out, torch.full_like(out, float("nan")))


def _nanmean(v: Tensor, keep: Tensor | None = None) -> Tensor:
    v = v.double()
    ok = ~torch.isnan(v) if keep is None else (~torch.isnan(v) & keep)
    s = torch.where(ok, v, torch.zeros_like(v)).sum(-1)
    n = ok.sum(-1)
    return torch.where(n > 0, s / n.clamp(min=1), torch.full_like(s, float("nan")))


def token_logprobs(logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """``(log p, ell)``: log-softmax (B, N, V) and the log-probability of the true token (B, N)."""
    logp = F.log_softmax(logits.double(), -1)
    return logp, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def zlib_length(tokens: Tensor) -> Tensor:
    """Length in bytes of the zlib-compressed token sequence, per image. Discrete tokens are
    written as uint8 (uint16/32 for larger vocabularies); continuous ones quantised to 8 bits."""
    t = tokens.detach().cpu()
    if t.is_floating_point():
        arr = ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    else:
        m = int(t.max()) if t.numel() else 0
        arr = t.numpy().astype(np.uint8 if m < 256 else np.uint16 if m < 65536 else np.uint32)
    return torch.tensor([len(zlib.compress(row.tobytes())) for row in arr.reshape(arr.shape[0], -1)], dtype=torch.float64)


def unit_rescale(scores: Tensor) -> Tensor:
    """Map scores to [0, 1] by (s - min) / (max - min): monotone increasing, so the ranking,
    ROC, TPR@FPR and AUC are unchanged, also when every score is negative (dividing by the
    maximum, as some research code does, would reverse a negative ranking)."""
    s = scores.double()
    lo, hi = s.min(), s.max()
    return torch.zeros_like(s) if hi == lo else (s - lo) / (hi - lo)


# --------------------------------------------------------------------------- scores


def loss_score(ell: Tensor) -> Tensor:
    return _nanmean(ell)


def zlib_score(ell: Tensor, tokens: Tensor) -> Tensor:
    """-(mean NLL) / zlib length: the NLL/zlib ratio, negated so higher = member. The
    positive zlib length only rescales each image's NLL; it never changes its sign."""
    return -(-loss_score(ell)) / zlib_length(tokens).to(ell.device)


def hinge_score(logp: Tensor, tokens: Tensor) -> Tensor:
    ell = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    others = logp.scatter(-1, tokens.unsqueeze(-1), float("-inf")).amax(-1)
    return (ell - others).mean(-1)


def min_k_score(ell: Tensor, k: float) -> Tensor:
    return _lowest_k_mean(ell, k)


def min_k_plus_plus_score(logp: Tensor, tokens: Tensor, k: float) -> Tensor:
    p = logp.exp()
    mu = (p * logp).sum(-1)
    sigma = ((p * logp**2).sum(-1) - mu**2).clamp(min=0).sqrt()  # standard deviation, not variance
    ell = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    z = (ell - mu) / sigma.clamp(min=1e-12)
    return _lowest_k_mean(z, k)


def surp_selection(logp: Tensor, tokens: Tensor, k: float, entropy_max: float) -> Tensor:
    """SURP's token set S (B, N): low entropy (confident) and the true token among the
    image's k % least likely (ell_n <= the k-th percentile of its own ell)."""
    ell = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    H = -(logp.exp() * logp).sum(-1)
    n_k = max(1, int(k * ell.shape[-1]))
    tau = ell.sort(-1).values[..., n_k - 1: n_k]  # threshold in the same units as ell
    return (H < entropy_max) & (ell <= tau)


def surp_score(logp: Tensor, tokens: Tensor, k: float, entropy_max: float) -> Tensor:
    """Mean ell over SURP's set; NaN when no token passes the entropy filter."""
    ell = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return _nanmean(ell, surp_selection(logp, tokens, k, entropy_max))


def camia_scores(ell: Tensor) -> dict[str, Tensor]:
    """The three CAMIA signals of §9.3.1 (NaN entries of ``ell`` are skipped)."""
    v = ell.double()
    valid = ~torch.isnan(v)
    below_mean = _nanmean(v, v < _nanmean(v).unsqueeze(-1))
    z = torch.where(valid, v, torch.zeros_like(v))
    csum, ccount = z.cumsum(-1), valid.double().cumsum(-1)
    prev_mean = torch.cat([torch.full_like(v[..., :1], float("nan")), csum[..., :-1] / ccount[..., :-1].clamp(min=1)], -1)
    prev_mean = torch.where(torch.cat([torch.zeros_like(valid[..., :1]), ccount[..., :-1] > 0], -1), prev_mean, torch.full_like(v, float("nan")))
    below_prefix = _nanmean(v, v < prev_mean)
    pos = torch.arange(v.shape[-1], dtype=torch.float64, device=v.device).expand_as(v)
    pm = _nanmean(torch.where(valid, pos, torch.full_like(v, float("nan")))).unsqueeze(-1)
    vm = _nanmean(v).unsqueeze(-1)
    dx = torch.where(valid, pos - pm, torch.zeros_like(v))
    slope = (dx * torch.where(valid, v - vm, torch.zeros_like(v))).sum(-1) / (dx**2).sum(-1).clamp(min=1e-12)
    return {"camia_below_mean": below_mean, "camia_below_prefix": below_prefix, "camia_slope": slope}


# --------------------------------------------------------------------------- feature sets


@dataclass
class MIAConfig:
    ks: tuple[float, ...] = KS
    surp_entropies: tuple[float, ...] = SURP_ENTROPIES


def logit_features(logits: Tensor, tokens: Tensor, cfg: MIAConfig = MIAConfig()) -> dict[str, Tensor]:
    """Every MIA score of one logit tensor (conditional logits, or the CFG difference)."""
    logp, ell = token_logprobs(logits, tokens)
    out = {"loss": loss_score(ell), "zlib": zlib_score(ell, tokens), "hinge": hinge_score(logp, tokens)}
    for k in cfg.ks:
        out[f"mink_{round(100 * k)}"] = min_k_score(ell, k)
    for k in cfg.ks:
        out[f"minkpp_{round(100 * k)}"] = min_k_plus_plus_score(logp, tokens, k)
    for k in cfg.ks:
        for e in cfg.surp_entropies:
            out[f"surp_{round(100 * k)}_e{e:g}"] = surp_score(logp, tokens, k, e)
    out.update(camia_scores(ell))
    return out


def loss_features(ell: Tensor, tokens: Tensor, cfg: MIAConfig = MIAConfig()) -> dict[str, Tensor]:
    """The MIAs that apply to per-token losses only (MAR): loss, zlib, min-k%, CAMIA."""
    out = {"loss": loss_score(ell), "zlib": zlib_score(ell, tokens)}
    for k in cfg.ks:
        out[f"mink_{round(100 * k)}"] = min_k_score(ell, k)
    out.update(camia_scores(ell))
    return out


def family(name: str) -> str:
    """MIA family of a feature name: 'cfg_mink_20' -> 'cfg_mink', 'cond_surp_10_e4' -> 'cond_surp';
    the CAMIA signals have no hyperparameter: 'cfg_camia_below_mean' is its own family."""
    parts = name.split("_")
    return name if parts[1] == "camia" else "_".join(parts[:2])  # each CAMIA signal is its own MIA


# --------------------------------------------------------------------------- evaluation


def fill_nan_low(scores: Tensor) -> Tensor:
    """NaN scores (e.g. SURP with an empty set) rank as the least member-like."""
    s = scores.double()
    ok = ~torch.isnan(s)
    low = (s[ok].min() - 1.0) if ok.any() else torch.tensor(0.0, dtype=torch.float64)
    return torch.where(ok, s, low)


def validation_mask(is_member: Tensor, fraction: float = 0.3, seed: int = 0) -> Tensor:
    """A fixed, stratified share of members and non-members for choosing hyperparameters."""
    g = torch.Generator().manual_seed(seed)
    val = torch.zeros(len(is_member), dtype=torch.bool)
    for lab in (0, 1):
        idx = torch.nonzero(is_member == lab).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        val[idx[: int(round(fraction * len(idx)))]] = True
    return val


@dataclass
class MIAResult:
    name: str
    tpr_mean: float
    tpr_std: float
    auc_mean: float
    auc_std: float
    val_tpr: float = float("nan")
    extra: dict = field(default_factory=dict)


def repeated_evaluation(scores: Tensor, is_member: Tensor, repeats: int = 100, fraction: float = 0.5,
                        fpr: float = 0.01, seed: int = 0) -> tuple[Tensor, Tensor]:
    """TPR@FPR and AUC over ``repeats`` random subsets (``fraction`` of members and of
    non-members each time). Returns the two (repeats,) tensors."""
    from rsgm.metrics.membership import membership_roc

    s, y = fill_nan_low(scores), is_member.bool()
    pos, neg = torch.nonzero(y).flatten(), torch.nonzero(~y).flatten()
    g = torch.Generator().manual_seed(seed)
    tprs, aucs = [], []
    for _ in range(repeats):
        idx = torch.cat([pos[torch.randperm(len(pos), generator=g)[: max(1, int(fraction * len(pos)))]],
                         neg[torch.randperm(len(neg), generator=g)[: max(1, int(fraction * len(neg)))]]])
        f, t, _ = membership_roc(s[idx], y[idx])  # one exact ROC gives both (as tpr_at_fpr / membership_auc)
        tprs.append(t[f <= fpr + 1e-12].max())
        aucs.append(torch.trapezoid(t, f))
    return torch.stack(tprs), torch.stack(aucs)


def select_and_evaluate(names: list[str], features: Tensor, is_member: Tensor, val: Tensor, repeats: int = 100,
                        fpr: float = 0.01, seed: int = 0) -> list[MIAResult]:
    """Per MIA family: choose the hyperparameter (k, eps_e) with the best TPR@FPR on the
    validation rows (ties: AUC), then report it on the other rows over ``repeats`` random
    subsets. The reported rows never influence the choice."""
    from rsgm.metrics.membership import membership_auc, tpr_at_fpr

    y = is_member.bool()
    best: dict[str, tuple] = {}
    for j, n in enumerate(names):
        s = fill_nan_low(features[val, j])
        key = (float(tpr_at_fpr(s, y[val], fpr)), float(membership_auc(s, y[val])))
        fam = family(n)
        if fam not in best or key > best[fam][0]:
            best[fam] = (key, j)
    out = []
    for fam, (key, j) in best.items():
        t, a = repeated_evaluation(features[~val, j], is_member[~val], repeats, 0.5, fpr, seed)
        out.append(MIAResult(names[j], float(t.mean()), float(t.std()), float(a.mean()), float(a.std()), key[0]))
    return out
