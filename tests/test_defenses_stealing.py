import math

import pytest
import torch
import torch.nn.functional as F

from rsgm.defenses.stealing import (apply_remap, fit_linear_remap, info_nce_loss, linear_probe_accuracy,
                                    mean_cosine_distance, soft_nn_loss, surrogate_loss, train_surrogate)
from rsgm.defenses.transforms import make_user_transform


def test_info_nce_matches_explicit_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    ref = 0.0
    for i in range(6):
        sims = [F.cosine_similarity(s[i], t[j], dim=0) / 0.5 for j in range(6)]
        ref -= (sims[i] - torch.logsumexp(torch.stack(sims), 0)) / 6
    assert info_nce_loss(s, t, tau=0.5).item() == pytest.approx(ref.item(), rel=1e-5)


def test_soft_nn_matches_slow_reference():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    u = F.normalize(torch.cat([s, t]), dim=1)
    lab = list(range(4)) * 2
    total = 0.0
    for a in range(8):
        num = sum(math.exp(-float((u[a] - u[b]).pow(2).sum()) / 0.3) for b in range(8) if b != a and lab[b] == lab[a])
        den = sum(math.exp(-float((u[a] - u[b]).pow(2).sum()) / 0.3) for b in range(8) if b != a)
        total -= math.log(num / den) / 8
    assert soft_nn_loss(s, t, 0.3).item() == pytest.approx(total, rel=1e-5)
    with pytest.raises(ValueError, match="loss"):
        surrogate_loss("cosine", s, t)


def test_remap_recovers_affine_transform_and_fidelity_improves_with_overlap():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(600, 8, generator=g)
    secret = b"s" * 16
    ta, tb = make_user_transform("affine", 8, secret, "A"), make_user_transform("affine", 8, secret, "B")
    a, b = ta(r), tb(r)
    w = fit_linear_remap(b[:100], a[:100])
    assert mean_cosine_distance(apply_remap(w, b[100:]), a[100:]) < 1e-6
    # noisy answers: more overlapping queries give a better map
    na = a + 0.5 * torch.randn(a.shape, generator=g)
    nb = b + 0.5 * torch.randn(b.shape, generator=g)
    d = [mean_cosine_distance(apply_remap(fit_linear_remap(nb[:n], na[:n]), b[500:]), a[500:]) for n in (12, 50, 400)]
    assert d[0] > d[1] > d[2]
    with pytest.raises(ValueError, match="overlapping"):
        fit_linear_remap(b[:3], a[:4])


def test_linear_probe_against_sklearn_and_surrogate_learns():
    from sklearn.datasets import make_blobs

    x, y = make_blobs(400, n_features=5, centers=3, random_state=0)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    assert linear_probe_accuracy(x[:300], y[:300], x[300:], y[300:]) > 95
    # a linear "victim"; an MLP surrogate trained with MSE on its answers approaches it
    torch.manual_seed(0)
    victim = torch.nn.Linear(5, 4)
    targets = victim(x).detach()
    model = torch.nn.Sequential(torch.nn.Linear(5, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    before = F.mse_loss(model(x), targets).item()
    train_surrogate(model, x, targets, "mse", epochs=30, batch_size=64, lr=1e-2)
    assert F.mse_loss(model(x), targets).item() < 0.1 * before


def test_remap_sybils_pools_into_account0_space_and_checks_arguments():
    from rsgm.defenses.stealing import remap_sybils

    g = torch.Generator().manual_seed(0)
    r = torch.randn(120, 6, generator=g)
    maps = [torch.randn(6, 6, generator=g) for _ in range(3)]
    answers = [r @ m + i for i, m in enumerate(maps)]
    pooled, fid = remap_sybils(answers, overlap=40, holdout=10, grid=[5, 30, 31], names=["a", "b", "c"])
    assert pooled.shape == (120 + 80 + 80, 6)
    torch.testing.assert_close(pooled[:120], answers[0])
    torch.testing.assert_close(pooled[120:200], answers[0][40:], atol=1e-3, rtol=1e-3)
    assert [(f["account"], f["n_overlap"]) for f in fid] == [("b", 5), ("b", 30), ("c", 5), ("c", 30)]
    assert fid[1]["cosine_distance"] < 1e-6 < fid[0]["cosine_distance"]
    single, none = remap_sybils(answers[:1], overlap=0)
    assert torch.equal(single, answers[0]) and none == []
    with pytest.raises(ValueError, match="overlap"):
        remap_sybils(answers, overlap=40, holdout=40)
