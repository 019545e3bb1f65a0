"""IAR membership scores against hand-computed cases on fixed logits, plus the four
research-code bugs as regression tests."""

import math
import zlib

import numpy as np
import pytest
import torch

from rsgm.privacy import iar_mia as M

# One image, N = 4 positions, V = 3; true tokens 0, 1, 2, 0.
LOGITS = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.0, 1.0], [0.0, 4.0, 0.0]]])
TOKENS = torch.tensor([[0, 1, 2, 0]])


def _hand():
    logp = [[v - math.log(sum(math.exp(u) for u in row)) for v in row] for row in LOGITS[0].tolist()]
    ell = [logp[n][t] for n, t in enumerate(TOKENS[0].tolist())]
    return logp, ell


def test_loss_and_zlib_hand_computed():
    _, ell = _hand()
    logp, e = M.token_logprobs(LOGITS, TOKENS)
    assert torch.allclose(e[0], torch.tensor(ell, dtype=torch.float64))
    assert M.loss_score(e).item() == pytest.approx(sum(ell) / 4)
    zl = len(zlib.compress(bytes([0, 1, 2, 0])))
    assert M.zlib_score(e, TOKENS).item() == pytest.approx((sum(ell) / 4) / zl)


def test_hinge_hand_computed():
    logp, ell = _hand()
    want = np.mean([ell[n] - max(v for j, v in enumerate(logp[n]) if j != t) for n, t in enumerate(TOKENS[0].tolist())])
    lp, _ = M.token_logprobs(LOGITS, TOKENS)
    assert M.hinge_score(lp, TOKENS).item() == pytest.approx(want)


def test_min_k_hand_computed():
    _, ell = _hand()
    e = torch.tensor([ell], dtype=torch.float64)
    s = sorted(ell)
    assert M.min_k_score(e, 0.5).item() == pytest.approx((s[0] + s[1]) / 2)
    assert M.min_k_score(e, 0.1).item() == pytest.approx(s[0])  # at least one token


def test_min_k_plus_plus_divides_by_std_not_variance():
    logp, ell = _hand()
    z = []
    for n, t in enumerate(TOKENS[0].tolist()):
        p = [math.exp(v) for v in logp[n]]
        mu = sum(pi * v for pi, v in zip(p, logp[n]))
        var = sum(pi * v * v for pi, v in zip(p, logp[n])) - mu**2
        z.append((ell[n] - mu) / math.sqrt(var) if var > 1e-12 else None)
    lp, _ = M.token_logprobs(LOGITS, TOKENS)
    got = M.min_k_plus_plus_score(lp[:, [0, 1, 3]], TOKENS[:, [0, 1, 3]], 0.34).item()  # drop the uniform row (sigma = 0)
    zz = sorted(v for v in (z[0], z[1], z[3]))
    assert got == pytest.approx(zz[0])
    # the variance version (a bug in one public implementation) gives a different number
    var_version = []
    for n in (0, 1, 3):
        p = [math.exp(v) for v in logp[n]]
        mu = sum(pi * v for pi, v in zip(p, logp[n]))
        var = sum(pi * v * v for pi, v in zip(p, logp[n])) - mu**2
        var_version.append((ell[n] - mu) / var)
    assert got != pytest.approx(min(var_version), rel=1e-3)


def test_surp_threshold_selects_tokens():
    lp, ell = M.token_logprobs(LOGITS, TOKENS)
    H = -(lp.exp() * lp).sum(-1)[0]
    # k = 50 % of 4 tokens: the 2 lowest ell; entropy bound above every H keeps both
    sel = M.surp_selection(lp, TOKENS, 0.5, float(H.max()) + 1)
    lowest2 = set(ell[0].argsort()[:2].tolist())
    assert set(torch.nonzero(sel[0]).flatten().tolist()) == lowest2
    assert M.surp_score(lp, TOKENS, 0.5, float(H.max()) + 1).item() == pytest.approx(float(ell[0, list(lowest2)].mean()))
    # a threshold in probability units compared with log-probabilities (the bug) selects nothing;
    # ours selects at least one token whenever the entropy filter lets it through
    for k in M.KS:
        assert M.surp_selection(lp, TOKENS, k, 100.0).sum() >= 1
    # the entropy filter removes the uniform position (H = log 3)
    sel = M.surp_selection(lp, TOKENS, 1.0, math.log(3) - 1e-6)
    assert not sel[0, 2] and sel[0, [0, 1, 3]].all()


def test_camia_hand_computed():
    ell = torch.tensor([[-1.0, -3.0, -2.0, -0.5]], dtype=torch.float64)
    c = M.camia_scores(ell)
    assert c["camia_below_mean"].item() == pytest.approx((-3.0 - 2.0) / 2)  # mean -1.625
    # running means of the preceding tokens: -, -1, -2, -2 -> below: -3 (pos 1), none at pos 2 (-2 !< -2)
    assert c["camia_below_prefix"].item() == pytest.approx(-3.0)
    x = np.arange(4.0)
    assert c["camia_slope"].item() == pytest.approx(np.polyfit(x, ell[0].numpy(), 1)[0])


def test_nan_tokens_are_skipped_for_loss_features():
    ell = torch.tensor([[-1.0, float("nan"), -3.0, -2.0]])
    f = M.loss_features(ell, torch.zeros(1, 4, 2))
    assert f["loss"].item() == pytest.approx(-2.0)
    assert f["mink_50"].item() == pytest.approx(-3.0)  # floor(0.5 * 3) = 1 token
    assert f["camia_slope"].item() == pytest.approx(np.polyfit([0, 2, 3], [-1, -3, -2], 1)[0])


def test_rescaling_never_flips_negative_scores():
    from rsgm.metrics.membership import membership_auc

    s = -torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 0])
    r = M.unit_rescale(s)
    assert torch.equal(r.argsort(), s.argsort())
    assert membership_auc(r, y) == membership_auc(s, y) == 1.0
    assert membership_auc(s / s.max(), y) == 0.0  # the buggy rescaling reverses it


def test_every_feature_is_oriented_member_high():
    """A model that puts more mass on the true tokens must score higher on every MIA."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 16, 5, generator=g)
    tokens = torch.randint(0, 5, (2, 16), generator=g)
    confident = base.clone()
    confident.scatter_add_(-1, tokens.unsqueeze(-1), torch.full((2, 16, 1), 3.0))
    lo, hi = M.logit_features(base, tokens), M.logit_features(confident, tokens)
    for name in ("loss", "zlib", "hinge", "mink_20", "minkpp_20", "camia_below_mean"):
        assert (hi[name] > lo[name]).all(), name


def test_family_and_selection_use_validation_only():
    assert M.family("cfg_mink_20") == "cfg_mink"
    assert M.family("cond_surp_10_e4") == "cond_surp"
    assert M.family("cfg_camia_slope") == "cfg_camia_slope"
    assert M.family("cfg_camia_below_mean") != M.family("cfg_camia_below_prefix")
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.ones(200), torch.zeros(200)]).long()
    good = y.double() + 0.3 * torch.randn(400, generator=g, dtype=torch.float64)
    noise = torch.randn(400, generator=g, dtype=torch.float64)
    val = M.validation_mask(y, 0.3, seed=0)
    assert int(val[y == 1].sum()) == 60 and int(val[y == 0].sum()) == 60
    res = M.select_and_evaluate(["cond_mink_10", "cond_mink_20"], torch.stack([noise, good], 1), y, val, repeats=5)
    assert res[0].name == "cond_mink_20" and res[0].auc_mean > 0.9


def test_cfg_difference_input_is_the_logit_difference():
    """The tailored attack feeds logits_cond - logits_null through the same code."""
    g = torch.Generator().manual_seed(1)
    lc, ln = torch.randn(1, 6, 4, generator=g), torch.randn(1, 6, 4, generator=g)
    t = torch.randint(0, 4, (1, 6), generator=g)
    d = M.logit_features(lc - ln, t)
    _, ell = M.token_logprobs(lc - ln, t)
    assert d["loss"].item() == pytest.approx(float(ell.mean()))
