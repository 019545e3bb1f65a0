"""Keyed noise: averaging repeats or tiny perturbations gains nothing; fresh noise costs coverage."""
import pytest
import torch
import torch.nn.functional as F

from rsgm.defenses.b4b import B4BDefense
from rsgm.defenses.noise import KeyedNoise, mix64

DIM, SIGMA = 64, 3.0


def _defense(tmp_path, **kw):
    kw = dict(noise="static", static_sigma=SIGMA, transform="none", n_proj=20, n_bits=12) | kw
    return B4BDefense(DIM, tmp_path / "s.sqlite", b"noise-test-secret-0123", **kw)


def _cos(a, b):
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


def test_averaging_200_repeats_gains_nothing(tmp_path):
    d = _defense(tmp_path)
    r = torch.randn(1, DIM, generator=torch.Generator().manual_seed(0))
    answers = torch.cat([d.respond("eve", r).representation for _ in range(200)])
    single = answers[0]
    assert _cos(answers.mean(0), r[0]) == pytest.approx(_cos(single, r[0]).item(), abs=1e-6)
    assert torch.allclose(answers, single.expand_as(answers))
    # the fresh-noise design this replaces: the mean of 200 draws is far closer to the clean answer
    fresh = r + SIGMA * torch.randn(200, DIM, generator=torch.Generator().manual_seed(1))
    assert _cos(fresh.mean(0), r[0]) > _cos(single, r[0]) + 0.3


def test_averaging_200_tiny_perturbations_gains_nothing(tmp_path):
    d = _defense(tmp_path)
    g = torch.Generator().manual_seed(0)
    r = torch.randn(1, DIM, generator=g)
    first = d.respond("eve", r)
    occupied = d.store.get("eve").occupied
    tiny = r + 1e-5 * torch.randn(200, DIM, generator=g)
    answers = torch.cat([d.respond("eve", t[None]).representation for t in tiny])
    assert d.store.get("eve").occupied == occupied  # every perturbation stayed in the cell: no coverage cost
    mean_gain = _cos(answers.mean(0), tiny.mean(0)) - _cos(first.representation[0], r[0])
    assert abs(mean_gain.item()) < 1e-4
    noise = answers - tiny
    assert torch.allclose(noise, noise[0].expand_as(noise), atol=1e-4)  # one offset for the whole cell


def test_fresh_noise_needs_a_new_cell_and_new_buckets_raise_coverage(tmp_path):
    d = _defense(tmp_path)
    g = torch.Generator().manual_seed(0)
    r = torch.randn(1, DIM, generator=g)
    a = d.respond("eve", r)
    before = d.store.get("eve").occupied
    far = -r  # opposite side of every hyperplane: a new bucket in every hash
    b = d.respond("eve", far)
    assert d.store.get("eve").occupied > before
    assert _cos(a.representation - r, b.representation - far).abs() < 0.5  # fresh noise
    # any bucket change gives independent noise; the noise does not reveal how many buckets moved
    kn = KeyedNoise(b"noise-test-secret-0123", 4096, rows=1 << 14)
    ids = torch.randint(0, 4096, (1, 20), generator=g)
    z0 = kn("eve", 5, ids)
    assert torch.equal(z0, kn("eve", 5, ids.clone()))
    for k in (1, 5, 20):
        moved = ids.clone()
        moved[0, :k] = (moved[0, :k] + 1) % 4096
        assert _cos(z0, kn("eve", 5, moved)).abs().item() < 0.1
    # a new coverage level, another user or another secret: independent noise
    assert _cos(z0, kn("eve", 6, ids)).abs().item() < 0.1
    assert _cos(z0, kn("bob", 5, ids)).abs().item() < 0.1
    assert _cos(z0, KeyedNoise(b"other-secret-0123456", 4096, rows=1 << 14)("eve", 5, ids)).abs().item() < 0.1
    assert z0.std().item() == pytest.approx(1.0, rel=0.05)


def test_mix64_is_splitmix64():
    import numpy as np

    # reference values of the splitmix64 finaliser computed with Python integers
    def ref(x):
        m = (1 << 64) - 1
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & m
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & m
        return x ^ (x >> 31)

    xs = [0, 1, 2**40 + 7, 2**64 - 1]
    assert mix64(np.array(xs, dtype=np.uint64)).tolist() == [ref(x) for x in xs]
