"""The direction of the CFG difference (``cfg_difference``): cond - null (thesis text) vs
null - cond (the authors' code, scores negated a priori so higher = member), on fixed logits."""

import math

import pytest
import torch

from rsgm.errors import RSGMError
from rsgm.privacy.iar_features import IARFeatureConfig, masked_model_features, token_model_features

# Two images, N = 2 positions, V = 2; every true token is 0. Image A, then image B.
LC = torch.tensor([[[3.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [2.0, 0.0]]])
LN = torch.tensor([[[1.0, 1.0], [1.0, 0.0]], [[0.0, 0.0], [1.0, 0.0]]])
TOKENS = torch.zeros(2, 2, dtype=torch.long)
NULL = -1


def softplus(x):
    return math.log1p(math.exp(x))


class _Stub:
    """A token target whose two passes return LC (true class) and LN (null class)."""

    kind = "token"

    def __init__(self):
        self.calls = 0

    def tokenize(self, x):
        return TOKENS.clone()

    def null_cond(self, n, device):
        return torch.full((n,), NULL)

    def logits(self, tokens, cond):
        self.calls += 1
        return LN.clone() if bool((cond == NULL).all()) else LC.clone()


def features(direction):
    stub = _Stub()
    cfg = IARFeatureConfig(cfg_difference=direction, ks=(0.5,), surp_entropies=(8.0,))
    out = token_model_features(stub, torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), torch.arange(2), cfg)
    return out["features"], stub.calls


def test_null_minus_cond_hand_computed_and_negated():
    """d = LN - LC: A = [[-2, 1], [0, -1]], B = [[-1, 0], [-1, 0]]; with V = 2, log p(token 0)
    = -softplus(d_1 - d_0), so loss_A = -(softplus(3) + softplus(-1)) / 2, loss_B = -softplus(1);
    the feature is minus that. hinge = mean(d_0 - d_1): A = (-3 + 1) / 2, B = -1; negated."""
    f, calls = features("null_minus_cond")
    assert calls == 2  # still one conditional and one null pass per batch
    want_loss = [(softplus(3) + softplus(-1)) / 2, softplus(1)]
    assert f["cfg_loss"].tolist() == pytest.approx(want_loss, abs=1e-12)
    assert f["cfg_hinge"].tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    # min-k% at k = 50 %: the lowest of the two ell per image, negated.
    assert f["cfg_mink_50"].tolist() == pytest.approx([softplus(3), softplus(1)], abs=1e-12)


def test_cond_minus_null_hand_computed():
    """d = LC - LN: A = [[2, -1], [0, 1]], B = [[1, 0], [1, 0]]; no negation."""
    f, _ = features("cond_minus_null")
    assert f["cfg_loss"].tolist() == pytest.approx([-(softplus(-3) + softplus(1)) / 2, -softplus(-1)], abs=1e-12)


def test_the_two_directions_rank_differently_and_cond_features_do_not_move():
    """softmax(d) and softmax(-d) differ: cond - null ranks B above A, null - cond A above B."""
    a, _ = features("cond_minus_null")
    b, _ = features("null_minus_cond")
    assert a["cfg_loss"][1] > a["cfg_loss"][0] and b["cfg_loss"][0] > b["cfg_loss"][1]
    for k in a:
        if k.startswith("cond_"):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True)


def test_unknown_direction_is_a_one_line_error():
    with pytest.raises(RSGMError, match="cfg_difference"):
        IARFeatureConfig(cfg_difference="null-cond")


def test_masked_targets_reject_the_option():
    cfg = IARFeatureConfig(cfg_difference="null_minus_cond")
    with pytest.raises(RSGMError, match="token models only"):
        masked_model_features(object(), torch.zeros(1, 1), torch.zeros(1), torch.zeros(1), cfg)
