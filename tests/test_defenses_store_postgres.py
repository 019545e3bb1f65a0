"""The PostgreSQL state store against a real local server: atomic batches across processes and replicas."""
import multiprocessing as mp
import threading
import uuid

import pytest
import torch

from postgres_server import postgres_db, postgres_url  # noqa: F401  (fixtures)
from rsgm.defenses.b4b import B4BDefense
from rsgm.defenses.lsh import LSHCoverage
from rsgm.defenses.store import PostgresStore, open_store

N_PROJ, N_BITS = 2, 10


def batch_ids(worker, step):
    """Disjoint buckets per (worker, step), so a lost update shows as missing buckets."""
    b = worker * 40 + step * 4
    return torch.tensor([[b + i, b + i] for i in range(4)])


def _proc_worker(url, user, worker, n_steps):
    store = PostgresStore(url, LSHCoverage(4, N_PROJ, N_BITS))
    for s in range(n_steps):
        store.record(user, batch_ids(worker, s))
    store.close()


def test_postgres_processes_and_threads_lose_no_update(postgres_db):  # noqa: F811
    user = f"shared-{uuid.uuid4().hex[:6]}"
    store = open_store(postgres_db, LSHCoverage(4, N_PROJ, N_BITS))
    assert isinstance(store, PostgresStore)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_proc_worker, args=(postgres_db, user, w, 6)) for w in range(4)]
    [p.start() for p in procs]
    threads = [threading.Thread(target=lambda w=w: [store.record(user, batch_ids(w, s)) for s in range(6)]) for w in (4, 5)]
    [t.start() for t in threads]
    [p.join(120) for p in procs]
    [t.join(120) for t in threads]
    assert all(p.exitcode == 0 for p in procs)
    st = store.get(user)
    assert st.n_queries == 6 * 6 * 4 and st.occupied == 6 * 6 * 4 * 2
    assert st.coverage == pytest.approx(6 * 6 * 4 / 1024)


def test_postgres_failed_pricing_is_not_charged_and_lsh_is_checked(postgres_db):  # noqa: F811
    store = PostgresStore(postgres_db, LSHCoverage(4, N_PROJ, N_BITS))
    user = f"eve-{uuid.uuid4().hex[:6]}"
    store.record(user, batch_ids(0, 0))
    before = store.get(user)
    with pytest.raises(ValueError, match="charged"):
        store.record(user, batch_ids(1, 0), lambda c: float("nan"))
    assert store.get(user) == before
    assert store.get("nobody-ever").n_queries == 0
    with pytest.raises(ValueError, match="LSH"):
        PostgresStore(postgres_db, LSHCoverage(4, N_PROJ, N_BITS, seed=3))


def test_defense_on_postgres_matches_sqlite(postgres_db, tmp_path):  # noqa: F811
    r = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    kw = dict(noise="coverage", lam=1e-3, alpha=1.0, beta=0.1, transform="affine", n_proj=N_PROJ, n_bits=N_BITS)
    user = f"u-{uuid.uuid4().hex[:6]}"
    a = B4BDefense(4, postgres_db, b"s" * 16, **kw).respond(user, r)
    b = B4BDefense(4, tmp_path / "s.sqlite", b"s" * 16, **kw).respond(user, r)
    assert a.coverage == b.coverage and a.sigma == b.sigma
    torch.testing.assert_close(a.representation, b.representation)


@pytest.mark.slow
def test_two_server_replicas_on_one_postgres_lose_no_update(postgres_db, tmp_path):  # noqa: F811
    from concurrent.futures import ThreadPoolExecutor

    from serving_helpers import Server, write_config

    path, cfg = write_config(tmp_path, api_keys={"key-r": f"replicated-{uuid.uuid4().hex[:6]}"})
    user = cfg["api_keys"]["key-r"]
    replicas = [Server(path, "--state.url", postgres_db), Server(path, "--state.url", postgres_db)]
    try:
        g = torch.Generator().manual_seed(0)
        batches = [torch.rand(3, 1, 16, 16, generator=g).tolist() for _ in range(40)]
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda i: replicas[i % 2].post({"inputs": batches[i]}, "key-r")[0], range(40)))
    finally:
        for s in replicas:
            s.stop()
    assert codes.count(200) == 40
    st = PostgresStore(postgres_db, LSHCoverage(16, 4, 8)).get(user)
    assert st.n_queries == 120
    # the same 120 inputs hashed in one process give the same buckets: no batch was lost
    from rsgm.serving.server import ServeSettings, load_encoder

    enc = load_encoder(ServeSettings.from_config(cfg))
    lsh = LSHCoverage(16, 4, 8, precision="bf16")
    state = lsh.empty_state()
    with torch.no_grad():
        lsh.mark(state, lsh.bucket_ids(enc(torch.tensor(batches).view(-1, 1, 16, 16))))
    assert st.occupied == lsh.occupied(state)
