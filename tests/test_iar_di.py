"""IAR dataset inference: batched procedure vs the straightforward loop, null false-positive
rate, direction, and the min |P| search."""

import numpy as np
import pytest
import torch

from rsgm.privacy import iar_di as D
from rsgm.privacy import stats as S


def _pools(shift=0.5, d=6, n_m=150, n_n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n_m, d, generator=g, dtype=torch.float64) + shift
    u = torch.randn(n_n, d, generator=g, dtype=torch.float64)
    m[::7, 2] = float("nan")  # a feature that is sometimes undefined (SURP with an empty set)
    return m, u


def test_size_grid():
    assert D.size_grid(300) == list(range(2, 11)) + list(range(20, 101, 10)) + [200, 300]


def test_minmax_sum_hand_computed():
    X = torch.tensor([[[0.0, 10.0], [2.0, float("nan")], [4.0, 5.0]]])  # P = row 0, U = rows 1-2
    sP, sU = D.minmax_sum(X, 1)
    # NaN -> 0; col 0 range 0..4, col 1 range 0..10
    assert sP.tolist() == [[0.0 + 1.0]]
    assert sU[0].tolist() == pytest.approx([0.5 + 0.0, 1.0 + 0.5])


def test_batched_matches_loop():
    m, u = _pools()
    draw = S.draw_trials(len(m), len(u), 20, 20, 30, 1, 0.0, seed=3)
    assert np.allclose(D.sum_di_pvalues(m, u, draw).numpy(), D.loop_sum_di(m.numpy(), u.numpy(), draw), atol=1e-10)


def test_null_false_positive_rate_at_most_2_percent():
    """1000 trials on non-member-only P: rejection rate at alpha = 0.01 stays within the binomial interval."""
    _, u = _pools(d=8, n_n=600)
    for n in (10, 100):
        res = D.null_false_positive_rate(u, n, trials=1000, alpha=0.01, seed=n)
        assert res["false_positive_rate"] <= 0.02, res["false_positive_rate"]
        assert res["ci_low"] <= 0.01 <= res["ci_high"] or res["false_positive_rate"] < 0.01


def test_wrong_direction_never_succeeds():
    m, u = _pools(shift=-1.0)  # "members" score lower than non-members
    size, rows = D.min_suspect_size(m, u, "sum", trials=200)
    assert size is None and all(r["mean_p"] > 0.5 for r in rows[3:])


def test_min_size_search_and_linear_baseline():
    m, u = _pools(shift=0.6)
    size, rows = D.min_suspect_size(m, u, "sum", trials=200)
    assert size is not None and rows[-1]["n_p"] == size and rows[-1]["mean_p"] <= 0.01
    assert all(r["mean_p"] > 0.01 for r in rows[:-1])
    lin, _ = D.min_suspect_size(m, u, "linear", trials=50)
    assert lin is not None and lin >= 5
