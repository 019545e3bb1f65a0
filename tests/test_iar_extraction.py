"""Extraction: candidates, validation-calibrated threshold, and a planted memorised sample
that is found in a model trained with it and not in one trained without it."""

import pytest
import torch

from rsgm.components.iar import MaskedIAR, RasterIAR
from rsgm.components.iar_adapters import BuiltinIARTarget
from rsgm.datamodules.membership import digits_images
from rsgm.privacy import iar_extraction as E


def test_top_candidates_per_class():
    d = torch.tensor([5.0, 1.0, 3.0, 0.0, 2.0, 9.0])
    c = torch.tensor([0, 0, 0, 1, 1, 1])
    assert E.top_candidates(d, c, 2).tolist() == [1, 2, 3, 4]


def test_pixel_similarity():
    a = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    assert torch.allclose(E.pixel_similarity(a, 2 * a + 1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(E.pixel_similarity(a, -a), -torch.ones(3, dtype=torch.float64))


class _ConstantMAR:
    """A masked target whose one-step prediction of every unknown token is 0.5 (hand case)."""

    kind = "masked"

    def __init__(self):
        self.m = MaskedIAR(dim=16, depth=1, head_width=16).eval()
        self.random_mask, self.tokenize, self.decode = self.m.random_mask, self.m.tokenize, self.m.decode

    def complete(self, tokens, known, cond, ar_steps=4, generator=None):
        return torch.where(known.unsqueeze(-1), tokens, torch.full_like(tokens, 0.5))


def test_masked_candidate_distance_hand_case():
    x, y = digits_images()
    x, y, idx = x[:5], y[:5], torch.arange(5)
    tgt = _ConstantMAR()
    d = E.masked_candidate_distance(tgt, x, y, idx, seed=0)
    t = tgt.tokenize(x)  # (5, 16, 4)
    from rsgm.privacy.iar_features import per_sample_generator

    for i in range(5):
        masked = tgt.random_mask(1, 0.95, generator=per_sample_generator(i, 0, 201))[0]
        assert int(masked.sum()) == 15  # 5 % of 16 tokens left unmasked: one token
        want = sum(float((t[i, n] - 0.5).pow(2).sum()) for n in range(16) if masked[n])
        assert abs(float(d[i]) - want) < 1e-9
    # independent of batching
    assert torch.equal(torch.cat([E.masked_candidate_distance(tgt, x[s], y[s], idx[s]) for s in (slice(0, 2), slice(2, 5))]), d)


def test_masked_prefix_completion_keeps_the_prefix():
    m = MaskedIAR(dim=16, depth=1, head_width=16).eval()
    tgt = BuiltinIARTarget(model=m)
    x, y = digits_images()
    t = tgt.tokenize(x[:3])
    sims, gen = E.complete_and_compare(tgt, x[:3], t, y[:3], 4, seed=0)
    assert sims.shape == (3,) and gen.shape == (3, 1, 8, 8)
    # the first 4 tokens (2x2 patches in raster order) are the top two pixel rows, kept as given
    assert torch.allclose(gen[:, :, :2], x[:3, :, :2].clamp(-1, 1))


def _train(x, y, steps=250, seed=0):
    torch.manual_seed(seed)
    m = RasterIAR(dim=32, depth=1, heads=2, cond_drop_prob=0.0)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(x), (64,), generator=g)
        loss = m.loss(x[i], y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return BuiltinIARTarget(model=m.eval()).load()


def _part(tgt, x, y):
    with torch.no_grad():
        t = tgt.tokenize(x)
        d = 100 - 100 * (tgt.logits(t, y).argmax(-1) == t).double().mean(-1)
    return {"images": x, "tokens": t, "cond": y, "distance": d}


@pytest.mark.slow
def test_planted_sample_is_extracted_only_from_the_model_that_saw_it():
    x, y = digits_images()
    train_x, train_y = x[:60], y[:60]
    val_x, val_y = x[1000:1300], y[1000:1300]
    g = torch.Generator().manual_seed(3)
    planted = (torch.randint(0, 2, (1, 1, 8, 8), generator=g).float() * 2 - 1)  # a random binary pattern, no digit
    with_x = torch.cat([train_x, planted.expand(20, -1, -1, -1)])  # seen 20 times per epoch: memorised
    with_y = torch.cat([train_y, torch.zeros(20, dtype=torch.long)])
    audit_x, audit_y = torch.cat([train_x, planted]), torch.cat([train_y, torch.zeros(1, dtype=torch.long)])
    planted_row = len(train_x)
    found = {}
    for name, (tx, ty) in {"with": (with_x, with_y), "without": (train_x, train_y)}.items():
        tgt = _train(tx, ty)
        res = E.extract(tgt, _part(tgt, audit_x, audit_y), _part(tgt, val_x, val_y), per_class=3, prefix_len=16)
        assert res.validation_false_positives == 0
        found[name] = res.extracted.tolist()
    assert planted_row in found["with"]
    assert planted_row not in found["without"]


def test_missing_sscd_is_one_line_error(tmp_path):
    from rsgm.errors import RSGMError

    with pytest.raises(RSGMError, match="SSCD model"):
        E.load_sscd(str(tmp_path / "sscd.pt"))
