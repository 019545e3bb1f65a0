import math

import numpy as np
import pytest
import torch

from rsgm.defenses.cost import b4b_sigma
from rsgm.defenses.lsh import LSHCoverage

# Methods spec §3.4 sanity table: coverage -> sigma for several (lam, alpha, beta).
SANITY = {
    (1e-6, 1, 0.8): [4.6e-6, 1.8e-4, 5.6e-3, 0.032, 1.0, 31.6],
    (1e-4, 1, 0.8): [2.2e-4, 3.1e-3, 0.032, 0.10, 1.0, 10],
    (1e-6, 1, 0.5): [1.5e-5, 4.0e-3, 1.0, 15.8, 4.0e3, 1e6],
    (1e-6, 1, 0.3): [9.9e-5, 1.0, 1e4, 1e6, 1e10, 1e14],
    (1e-6, 0.1, 0.3): [4.5e-5, 0.1, 215, 1e4, 2.2e7, 4.6e10],
    (1e-6, 1000, 0.6): [3.1e-5, 0.032, 31.6, 1000, 1e6, 1e9],
}
COVERAGES = [0.1, 0.3, 0.5, 0.6, 0.8, 1.0]


@pytest.mark.parametrize("params", list(SANITY))
def test_sigma_matches_sanity_table(params):
    for c, expected in zip(COVERAGES, SANITY[params]):
        # the table prints two significant digits
        assert b4b_sigma(c, *params) == pytest.approx(expected, rel=0.06), (params, c)


def test_sigma_endpoints_and_errors():
    assert b4b_sigma(0.0) == 0.0
    assert b4b_sigma(0.8, 1e-6, 1.0, 0.8) == pytest.approx(1.0 - 1e-6)
    with pytest.raises(ValueError, match="fraction"):
        b4b_sigma(80.0)
    with pytest.raises(ValueError, match="lam"):
        b4b_sigma(0.5, lam=0.0)


def slow_bucket(lsh, r):
    """Reference: loop over hashes and hyperplanes, build the integer bit by bit."""
    w = lsh.weight.view(lsh.dim, lsh.n_proj, lsh.n_bits)
    out = np.zeros((r.shape[0], lsh.n_proj), dtype=np.int64)
    for i in range(r.shape[0]):
        for p in range(lsh.n_proj):
            for k in range(lsh.n_bits):
                if float(r[i] @ w[:, p, k]) > 0:
                    out[i, p] += 2**k
    return out


def test_bucket_ids_match_reference_and_seed_is_fixed():
    lsh = LSHCoverage(dim=6, n_proj=3, n_bits=5, seed=7)
    r = torch.randn(12, 6, generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(lsh.bucket_ids(r).numpy(), slow_bucket(lsh, r))
    assert torch.equal(LSHCoverage(6, 3, 5, seed=7).weight, lsh.weight)
    assert not torch.equal(LSHCoverage(6, 3, 5, seed=8).weight, lsh.weight)
    with pytest.raises(ValueError, match="shape"):
        lsh.bucket_ids(torch.randn(3, 5))


def test_coverage_counts_distinct_buckets_and_pack_roundtrip():
    lsh = LSHCoverage(dim=4, n_proj=2, n_bits=3)
    state = lsh.empty_state()
    ids = torch.tensor([[0, 1], [0, 2], [5, 2]])  # hash 0: {0, 5}; hash 1: {1, 2}
    lsh.mark(state, ids)
    assert lsh.coverage(state) == pytest.approx((2 / 8 + 2 / 8) / 2)
    lsh.mark(state, ids)  # repeated queries occupy nothing new
    assert lsh.coverage(state) == pytest.approx(0.25)
    np.testing.assert_array_equal(lsh.unpack(lsh.pack(state)), state)
    # a point repeated many times stays in one bucket per hash
    one = lsh.empty_state()
    lsh.mark(one, lsh.bucket_ids(torch.ones(50, 4)))
    assert lsh.coverage(one) == pytest.approx(1 / 8)


def test_default_size_is_20_by_12_bits():
    lsh = LSHCoverage(dim=16)
    assert lsh.empty_state().shape == (20, 4096)
    assert len(lsh.pack(lsh.empty_state())) == 20 * 4096 // 8
    assert math.isclose(lsh.coverage(lsh.empty_state()), 0.0)
