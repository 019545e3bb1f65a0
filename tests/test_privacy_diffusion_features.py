"""Each CDI feature on a tiny model against a slow per-sample reference written here."""

import math

import pytest
import torch
from torch import nn

from rsgm.components.diffusion_adapters import DiffusionTarget
from rsgm.privacy.diffusion_features import (
    DiffusionFeatureExtractor, FeatureConfig, feature_names, minimum_rows_per_sample, sample_noise,
)


class TinyTarget(DiffusionTarget):
    """A smooth class-conditional eps-predictor with no batch coupling."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        betas = torch.linspace(1e-4, 0.02, 1000)
        super().__init__(torch.cumprod(1 - betas, 0))
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 1, 3, padding=1)
        self.emb = nn.Embedding(11, 4)
        self.double().freeze()

    def eps(self, z_t, t, cond):
        h = torch.tanh(self.conv(z_t) * (1 + t.float().view(-1, 1, 1, 1) / 500) + self.emb(cond).view(-1, 4, 1, 1))
        return self.out(h)


CFG = dict(gm_timesteps=[0, 300, 600], ml_timesteps=[0, 500, 900], secmi_t=30, secmi_delta=10, seed=3)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(1)
    target = TinyTarget()
    x = torch.rand(6, 1, 6, 6, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, 10, (6,))
    index = torch.tensor([5, 11, 2, 40, 7, 8])
    cfg = FeatureConfig(**CFG, pia_p=5.0)
    ext = DiffusionFeatureExtractor(cfg)
    feats = ext(target, x, y, index)
    return target, x, y, index, cfg, ext, feats


def col(ext, feats, name):
    return feats[:, ext.names.index(name)].double()


def ab(target):
    return target.alphas_cumprod


def eps1(target, z, t, c):  # one sample at a time
    return target.eps(z.unsqueeze(0), torch.tensor([t]), c.view(1))[0]


def test_names_and_shape(setup):
    target, x, y, index, cfg, ext, feats = setup
    assert feats.shape == (6, len(ext.names)) and torch.isfinite(feats).all()
    assert ext.names[:4] == ["dl", "secmi", "pia", "pian"] and ext.names[-2:] == ["no_loss", "no_delta"]


def test_denoising_loss_and_multiple_loss(setup):
    target, x, y, index, cfg, ext, feats = setup
    a = ab(target)
    for i in range(6):
        noise = sample_noise(index[i:i + 1], (cfg.dl_draws, 1, 6, 6), cfg.seed, 1)[0].double()
        ref = sum(((e - eps1(target, a[100].sqrt() * x[i] + (1 - a[100]).sqrt() * e, 100, y[i])) ** 2).sum() for e in noise) / cfg.dl_draws
        assert float(col(ext, feats, "dl")[i]) == pytest.approx(float(ref), rel=1e-5)
        noise = sample_noise(index[i:i + 1], (3, 1, 6, 6), cfg.seed, 3)[0].double()
        for j, t in enumerate(cfg.ml_timesteps):
            e = noise[j]
            ref = ((e - eps1(target, a[t].sqrt() * x[i] + (1 - a[t]).sqrt() * e, t, y[i])) ** 2).sum()
            assert float(col(ext, feats, f"ml_t{t}")[i]) == pytest.approx(float(ref), rel=1e-5)


def test_secmi(setup):
    target, x, y, index, cfg, ext, feats = setup
    a = ab(target)

    def move(zs, s, n):
        e = eps1(target, zs, s, y[i])
        x0 = (zs - (1 - a[s]).sqrt() * e) / a[s].sqrt()
        return a[n].sqrt() * x0 + (1 - a[n]).sqrt() * e

    for i in range(6):
        z = x[i]
        for s in (0, 10, 20):
            z = move(z, s, s + 10)
        back = move(move(z, 30, 40), 40, 30)
        assert float(col(ext, feats, "secmi")[i]) == pytest.approx(float(((back - z) ** 2).sum()), rel=1e-4)


def test_pia_and_pian(setup):
    target, x, y, index, cfg, ext, feats = setup
    a, t = ab(target), 200
    for i in range(6):
        e0 = eps1(target, x[i], 0, y[i])
        pia = ((e0 - eps1(target, a[t].sqrt() * x[i] + (1 - a[t]).sqrt() * e0, t, y[i])).abs() ** 5).sum() ** (1 / 5)
        en = 36 * math.sqrt(math.pi / 2) * e0 / e0.abs().sum()
        pian = ((en - eps1(target, a[t].sqrt() * x[i] + (1 - a[t]).sqrt() * en, t, y[i])).abs() ** 5).sum() ** (1 / 5)
        assert float(col(ext, feats, "pia")[i]) == pytest.approx(float(pia), rel=1e-5)
        assert float(col(ext, feats, "pian")[i]) == pytest.approx(float(pian), rel=1e-5)


def test_gradient_masking(setup):
    target, x, y, index, cfg, ext, feats = setup
    a = ab(target)
    for i in range(6):
        noise = sample_noise(index[i:i + 1], (3, 1, 6, 6), cfg.seed, 2)[0].double()
        for j, t in enumerate(cfg.gm_timesteps):
            e = noise[j]
            zt = (a[t].sqrt() * x[i] + (1 - a[t]).sqrt() * e).requires_grad_(True)
            loss = ((e - eps1(target, zt, t, y[i])) ** 2).sum()
            g = torch.autograd.grad(loss, zt)[0].abs().flatten()
            order = torch.argsort(g, descending=True)
            m = torch.zeros(36, dtype=torch.float64)
            m[order[: round(0.2 * 36)]] = 1
            m = m.view(1, 6, 6)
            zt = zt.detach()
            zhat = e * m + zt * (1 - m)
            with torch.no_grad():
                ref = (((e - zt) * m - eps1(target, zhat, t, y[i]) * m) ** 2).sum()
            assert float(col(ext, feats, f"gm_t{t}")[i]) == pytest.approx(float(ref), rel=1e-4)


def test_noise_optimisation_matches_torch_lbfgs(setup):
    target, x, y, index, cfg, ext, feats = setup
    a, t = ab(target), 100
    for i in range(6):
        e = sample_noise(index[i:i + 1], (1, 6, 6), cfg.seed, 4)[0].double()
        zt = a[t].sqrt() * x[i] + (1 - a[t]).sqrt() * e
        delta = torch.zeros_like(zt, requires_grad=True)
        opt = torch.optim.LBFGS([delta], lr=1.0, max_iter=5, history_size=100)

        def closure():
            opt.zero_grad()
            loss = ((e - eps1(target, zt + delta, t, y[i])) ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            final = ((e - eps1(target, zt + delta, t, y[i])) ** 2).sum()
        assert float(col(ext, feats, "no_loss")[i]) == pytest.approx(float(final), rel=1e-3)
        assert float(col(ext, feats, "no_delta")[i]) == pytest.approx(float((delta.detach() ** 2).sum()), rel=1e-3)


def test_features_do_not_depend_on_batching(setup):
    target, x, y, index, cfg, ext, feats = setup
    ext2 = DiffusionFeatureExtractor(FeatureConfig(**CFG, pia_p=5.0, max_batch=4))
    perm = torch.tensor([3, 0, 5])
    part = ext2(target, x[perm], y[perm], index[perm])
    torch.testing.assert_close(part, feats[perm], rtol=1e-4, atol=1e-6)


def test_rows_per_sample_at_minimum(setup):
    target, x, y, index, cfg, ext, feats = setup
    minimum = minimum_rows_per_sample(cfg)
    for name in cfg.features:
        assert ext.rows_per_sample[name] <= minimum[name], name


def test_unknown_feature_and_names():
    with pytest.raises(ValueError, match="unknown diffusion features"):
        FeatureConfig(features=["dl", "clip"])
    assert feature_names(FeatureConfig(features=["ml", "dl"], ml_timesteps=[0, 100])) == ["ml_t0", "ml_t100", "dl"]
