import multiprocessing as mp
import threading

import numpy as np
import pytest
import torch

from rsgm.defenses.b4b import B4BDefense, load_or_create_secret
from rsgm.defenses.lsh import LSHCoverage
from rsgm.defenses.store import UserStateStore

N_PROJ, N_BITS = 2, 10


def batch_ids(worker, step):
    """Disjoint buckets per (worker, step), so a lost update shows as missing buckets."""
    b = worker * 40 + step * 4
    return torch.tensor([[b + i, b + i] for i in range(4)])


def _proc_worker(path, worker, n_steps):
    store = UserStateStore(path, LSHCoverage(4, N_PROJ, N_BITS))
    for s in range(n_steps):
        store.record("shared", batch_ids(worker, s))
    store.close()


def test_state_persists_across_reopen(tmp_path):
    lsh = LSHCoverage(4, N_PROJ, N_BITS)
    store = UserStateStore(tmp_path / "s.sqlite", lsh)
    st = store.record("alice", torch.tensor([[1, 2], [3, 2]])).state
    assert st.n_queries == 2 and st.coverage == pytest.approx((2 + 1) / (2 * 1024))
    store.close()
    again = UserStateStore(tmp_path / "s.sqlite", LSHCoverage(4, N_PROJ, N_BITS))
    assert again.get("alice") == st
    assert again.get("nobody").coverage == 0.0 and again.users() == ["alice"]
    with pytest.raises(ValueError, match="LSH"):
        UserStateStore(tmp_path / "s.sqlite", LSHCoverage(4, N_PROJ, N_BITS, seed=1))
    with pytest.raises(FileNotFoundError, match="state store"):
        UserStateStore(tmp_path / "missing" / "s.sqlite", lsh)


def test_concurrent_threads_lose_no_update(tmp_path):
    path = tmp_path / "t.sqlite"
    store = UserStateStore(path, LSHCoverage(4, N_PROJ, N_BITS))

    def work(w):
        for s in range(10):
            store.record("shared", batch_ids(w, s))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    st = store.get("shared")
    assert st.n_queries == 6 * 10 * 4
    assert st.coverage == pytest.approx(6 * 10 * 4 / 1024)


def test_concurrent_processes_lose_no_update(tmp_path):
    path = str(tmp_path / "p.sqlite")
    UserStateStore(path, LSHCoverage(4, N_PROJ, N_BITS)).close()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_proc_worker, args=(path, w, 8)) for w in range(4)]
    [p.start() for p in procs]
    [p.join(60) for p in procs]
    assert all(p.exitcode == 0 for p in procs)
    st = UserStateStore(path, LSHCoverage(4, N_PROJ, N_BITS)).get("shared")
    assert st.n_queries == 4 * 8 * 4 and st.coverage == pytest.approx(4 * 8 * 4 / 1024)


def test_defense_pipeline_restart_keeps_coverage_and_transform(tmp_path):
    secret = load_or_create_secret(tmp_path / "secret.bin")
    assert load_or_create_secret(tmp_path / "secret.bin") == secret and len(secret) == 32
    r = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(dim=8, state=tmp_path / "s.sqlite", secret=secret, transform="affine", noise="static", static_sigma=0.0)
    d1 = B4BDefense(**kw)
    a = d1.respond("alice", r)
    b = d1.respond("bob", r[:10])
    assert a.n_queries == 300 and a.coverage > b.coverage > 0
    d1.store.close()
    d2 = B4BDefense(**kw)  # restart
    assert d2.store.get("alice").coverage == pytest.approx(a.coverage)
    torch.testing.assert_close(d2.respond("alice", r).representation, a.representation)
    assert d2.store.get("alice").n_queries == 600
    assert not torch.allclose(d2.respond("bob", r).representation, a.representation)


def test_defense_sigma_follows_cost_and_bad_input_changes_nothing(tmp_path):
    d = B4BDefense(dim=8, state=tmp_path / "s.sqlite", secret=b"x" * 16, transform="none",
                   lam=1e-6, alpha=1.0, beta=0.3, n_proj=4, n_bits=4)
    r = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    resp = d.respond("eve", r)
    assert resp.sigma == pytest.approx(1e-6 * ((1 / 1e-6) ** (resp.coverage / 0.3) - 1))
    assert resp.sigma > 1.0  # 200 spread queries cover far beyond beta = 30 %
    np.testing.assert_allclose((resp.representation - r).std().item(), resp.sigma, rtol=0.1)
    before = d.store.get("eve")
    for bad in (torch.randn(3, 7), torch.full((2, 8), float("nan")), torch.empty(0, 8)):
        with pytest.raises(ValueError):
            d.respond("eve", bad)
    assert d.store.get("eve") == before


def test_failed_pricing_charges_nothing_and_small_beta_does_not_overflow(tmp_path):
    store = UserStateStore(tmp_path / "s.sqlite", LSHCoverage(4, N_PROJ, N_BITS))
    store.record("eve", batch_ids(0, 0))
    before = store.get("eve")

    def broken_price(coverage):
        raise OverflowError("cost function blew up")

    for price in (broken_price, lambda c: float("inf"), lambda c: float("nan"), lambda c: -1.0):
        with pytest.raises((OverflowError, ValueError)):
            store.record("eve", batch_ids(1, 0), price)
        assert store.get("eve") == before  # rolled back: not charged
    d = B4BDefense(dim=8, state=tmp_path / "t.sqlite", secret=b"x" * 16, transform="none",
                   lam=1e-6, alpha=10.0, beta=1e-4, n_proj=4, n_bits=4)
    resp = d.respond("eve", torch.randn(50, 8, generator=torch.Generator().manual_seed(0)))
    assert resp.sigma == 1e30 and torch.isfinite(resp.representation).all()
