"""Utility scores of generated digits: classifier accuracy and the feature-space FID."""

import numpy as np
import pytest
import torch
from scipy import linalg

from rsgm.callbacks.iar_report import matched_setting
from rsgm.components.iar import RasterIAR
from rsgm.components.iar_adapters import BuiltinIARTarget
from rsgm.datamodules.membership import digits_images
from rsgm.lightning_modules.iar_attack import feature_fid
from rsgm.privacy.iar_utility import classifier_accuracy, fit_digit_classifier, fit_feature_net, generation_utility, hidden_features


@pytest.fixture(scope="module")
def digits():
    x, y = digits_images(8)
    return x, y


def test_hidden_features_are_the_mlp_penultimate_layer(digits):
    x, y = digits
    net = fit_feature_net(x[:600], y[:600], hidden=16)
    h = hidden_features(net, x[600:700]).numpy()
    assert h.shape == (100, 16) and (h >= 0).all()
    logits = h @ net.coefs_[1] + net.intercepts_[1]  # the output layer on top gives sklearn's probabilities
    p = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(p / p.sum(1, keepdims=True), net.predict_proba(x[600:700].flatten(1).double().numpy()), rtol=1e-6, atol=1e-9)


def test_feature_fid_matches_scipy_and_orders_real_vs_noise(digits):
    x, y = digits
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 5, generator=g), 0.5 + 2 * torch.randn(200, 5, generator=g)
    ca, cb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    ref = np.sum((a.numpy().mean(0) - b.numpy().mean(0)) ** 2) + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert feature_fid(a, b) == pytest.approx(ref, rel=1e-6)
    net = fit_feature_net(x, y, hidden=32)
    real = hidden_features(net, x)
    held = feature_fid(real, hidden_features(net, x[:200]))
    noise = feature_fid(real, hidden_features(net, torch.rand(200, 1, 8, 8, generator=g) * 2 - 1))
    assert held < 0.2 * noise  # real digits are far closer to the real digits than uniform noise


def test_generation_utility_passes_sampling_options(digits):
    x, y = digits
    torch.set_num_threads(1)  # tiny per-token passes: extra threads only contend on a loaded CPU
    clf = fit_digit_classifier(x, y)
    assert classifier_accuracy(clf, x[:200], y[:200]) > 0.9
    torch.manual_seed(0)
    target = BuiltinIARTarget(model=RasterIAR(dim=16, depth=1)).load()
    hot = generation_utility(target, clf, 2, seed=0)
    greedy = generation_utility(target, clf, 2, seed=0, sampling={"temperature": 0.0})
    again = generation_utility(target, clf, 2, seed=0, sampling={"temperature": 0.0})
    assert torch.equal(greedy["samples"], again["samples"]) and not torch.equal(greedy["samples"], hot["samples"])
    assert (greedy["samples"][::2] == greedy["samples"][1::2]).all()  # greedy: one image per class


def test_matched_setting_picks_the_closest_utility_then_the_lower_fid():
    sweep = [{"temperature": 1.0, "accuracy": 0.5, "fid": 9.0}, {"temperature": 0.5, "accuracy": 1.0, "fid": 5.0},
             {"temperature": 0.7, "accuracy": 0.625, "fid": 4.0}, {"temperature": 0.6, "accuracy": 0.875, "fid": 3.0}]
    assert matched_setting(sweep, 0.75)["temperature"] == 0.6  # 0.625 and 0.875 tie at 0.125: lower FID
    assert matched_setting(sweep, 0.95)["temperature"] == 0.5
    assert matched_setting([], 0.9) is None and matched_setting(sweep, None) is None
