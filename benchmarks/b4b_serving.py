"""Throughput and latency of ``rsgm serve`` under concurrent clients over loopback, and the cost
of a new user.

    python benchmarks/b4b_serving.py [--clients 1 16 64] [--seconds 5] [--inputs 8] [--skip-postgres]
                                     [--new-users 2000] [--new-user-dim 2048]

Servers (each a real ``rsgm serve`` process on 127.0.0.1, the testbed CNN with random weights,
1 inference worker, 1 thread): the bare encoder (``--no-defense``), B4B with SQLite state, and
B4B with PostgreSQL state (a throw-away local server; skipped without the binaries).  Every
client has its own API key (so batches mix users) and sends requests of ``--inputs`` images
back to back for ``--seconds``.  Prints requests/s, p50 and p99 latency per setting, and the
defended/bare throughput ratio.

Then the cost of a new user at ``--new-user-dim`` (2048): requests alternate between one known
user and a user never seen before (so both see the same machine load), in-process
(``B4BDefense.respond``) and over HTTP against one server with a 2048-d encoder (SQLite, and
PostgreSQL when available).  The table gives both medians, their difference and the median of
the paired differences (the added cost of a new user: transform derivation + first state row),
and resident memory after ``--new-users`` users (the transform cache is an LRU of
``cache_size``).  ``--clients`` with no value runs only this part.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import yaml
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from rsgm.components.encoders import SmallConvEncoder  # noqa: E402
from rsgm.defenses.b4b import B4BDefense  # noqa: E402


def start_server(cfg_path: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "rsgm.serving.cli", "--config", str(cfg_path), "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    for line in proc.stdout:
        if "listening on" in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep the pipe drained
            return proc, line.strip().split("http://")[1].split("/")[0]
    raise RuntimeError("server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    import signal

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def load(addr: str, n_clients: int, seconds: float, body: bytes) -> tuple[float, float, float, int]:
    """(requests/s, p50 ms, p99 ms, errors) for n_clients sending back to back."""
    lat: list[float] = []
    errors = 0
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=n_clients, max_keepalive_connections=n_clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker(i: int):
            nonlocal errors
            headers = {"Authorization": f"Bearer key-{i}", "Content-Type": "application/json"}
            while time.monotonic() < stop:
                t = time.perf_counter()
                r = await client.post(f"http://{addr}/v1/embed", content=body, headers=headers)
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t)
                else:
                    errors += 1
        t0 = time.monotonic()
        await asyncio.gather(*[worker(i) for i in range(n_clients)])
        wall = time.monotonic() - t0
    lat.sort()
    p = lambda q: 1e3 * lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    return len(lat) / wall, p(0.5), p(0.99), errors


def _summary(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return 1e3 * statistics.median(xs), 1e3 * xs[min(len(xs) - 1, int(0.99 * len(xs)))]


def _cost_rows(label: str, known: list[float], new: list[float]) -> list[tuple]:
    """Rows (setting, known p50, new p50, added p50, paired-difference p50, known p99, new p99), in ms."""
    k50, k99 = _summary(known)
    n50, n99 = _summary(new)
    paired = 1e3 * statistics.median([b - a for a, b in zip(known, new)])
    return [(label, k50, n50, n50 - k50, paired, k99, n99)]


def new_user_cost(dim: int, n_users: int, cache_size: int) -> list[tuple]:
    """In-process: alternate a known user's answer and a new user's first answer (same load for both)."""
    with tempfile.TemporaryDirectory() as tmp:
        d = B4BDefense(dim, Path(tmp) / "s.sqlite", b"benchmark-secret-0123456789", cache_size=cache_size)
        r = torch.randn(1, dim)
        d.respond("known", r)
        known, new = [], []
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for i in tqdm(range(n_users), desc="new users, in-process", leave=False, disable=None):
            known.append(_t(lambda: d.respond("known", r)))
            new.append(_t(lambda: d.respond(f"user-{i}", r)))
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cached = len(d._transforms)
        stages = {"known": [], "new": []}
        for i in range(min(n_users, 500)):  # the steps of B4BDefense.respond, timed one by one
            for kind, user in (("known", "known"), ("new", f"stage-{i}")):
                stages[kind].append(_step_times(d, user, r))
    print(f"  in-process: peak RSS {rss0:.0f} MiB before, {rss1:.0f} MiB after {n_users} new users; "
          f"transforms cached: {cached} (cache_size {cache_size})")
    print("  steps of one answer, median ms (known user / new user):")
    for j, name in enumerate(("LSH bucket ids", "store transaction (update / insert)", "keyed noise",
                              "transform lookup (cache hit / derivation)", "transform apply")):
        k = 1e3 * statistics.median(t[j] for t in stages["known"])
        n = 1e3 * statistics.median(t[j] for t in stages["new"])
        print(f"    {name:42s} {k:7.3f} / {n:7.3f}  (added {n - k:+.3f})")
    return _cost_rows("in-process (B4BDefense.respond)", known, new)


def _step_times(d: B4BDefense, user: str, r: torch.Tensor) -> list[float]:
    """Seconds of each step of ``B4BDefense.respond`` (same calls, same order)."""
    t = [time.perf_counter()]
    ids = d.lsh.bucket_ids(r)
    t.append(time.perf_counter())
    charge = d.store.record(user, ids, d.sigma_for)
    t.append(time.perf_counter())
    noisy = r + charge.sigma * d.noise(user, charge.state.occupied, ids)
    t.append(time.perf_counter())
    transform = d.transform_for(user)
    t.append(time.perf_counter())
    transform(noisy)
    t.append(time.perf_counter())
    return [b - a for a, b in zip(t, t[1:])]


def new_user_http(dim: int, n_users: int, tmp: Path, extra: tuple[str, ...] = (), label: str = "HTTP, SQLite") -> list[tuple]:
    """Over HTTP, one server with a ``dim``-d encoder: alternate a known key's request and a new key's first."""
    import json

    torch.manual_seed(0)
    torch.save(SmallConvEncoder(width=8, rep_dim=dim).state_dict(), tmp / f"enc{dim}.pt")
    cfg = {"encoder": {"class_path": "rsgm.components.encoders.SmallConvEncoder", "init_args": {"width": 8, "rep_dim": dim}},
           "encoder_weights": str(tmp / f"enc{dim}.pt"), "input_shape": [1, 16, 16], "max_batch": 16,
           "state_path": str(tmp / f"state{dim}.sqlite"), "secret_file": str(tmp / "secret.bin"),
           "api_keys": {f"key-{i}": f"user-{i}" for i in range(n_users + 1)},
           "defense": {"lam": 1e-6, "alpha": 10.0, "beta": 0.036, "transform": "affine"}, "batch_size": 1}
    (tmp / f"serve{dim}.yaml").write_text(yaml.safe_dump(cfg))
    body = json.dumps({"inputs": torch.rand(1, 1, 16, 16).tolist()}).encode()
    proc, addr = start_server(tmp / f"serve{dim}.yaml", *extra)
    known, new = [], []
    try:
        with httpx.Client(timeout=120) as client:
            def post(key: str) -> float:
                t = time.perf_counter()
                r = client.post(f"http://{addr}/v1/embed", content=body, headers={"Authorization": f"Bearer {key}"})
                dt = time.perf_counter() - t
                if r.status_code != 200:
                    raise RuntimeError(f"{key}: HTTP {r.status_code} {r.text}")
                return dt
            for _ in range(20):
                post("key-0")  # warm-up of the known user
            for i in tqdm(range(1, n_users + 1), desc=f"new users, {label}", leave=False, disable=None):
                known.append(post("key-0"))
                new.append(post(f"key-{i}"))
    finally:
        stop_server(proc)
    return _cost_rows(f"{label} (1 client, 1 image)", known, new)


def print_new_user_table(dim: int, n_users: int, rows: list[tuple]) -> None:
    print(f"\nnew user vs known user at dim {dim}, {n_users} new users, requests alternating known/new:")
    print("| setting | known p50 ms | new p50 ms | added p50 ms | added, paired p50 ms | known p99 ms | new p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for name, k50, n50, add, paired, k99, n99 in rows:
        print(f"| {name} | {k50:.2f} | {n50:.2f} | {add:+.2f} | {paired:+.2f} | {k99:.2f} | {n99:.2f} |")


def _t(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="*", default=[1, 16, 64], help="none (--clients): only the new-user part")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--inputs", type=int, default=8, help="images per request")
    ap.add_argument("--skip-postgres", action="store_true")
    ap.add_argument("--new-users", type=int, default=2000)
    ap.add_argument("--new-user-dim", type=int, default=2048)
    ap.add_argument("--cache-size", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="b4b_bench_"))
    torch.manual_seed(0)
    torch.save(SmallConvEncoder(width=32, rep_dim=64).state_dict(), tmp / "enc.pt")
    n_keys = max(args.clients, default=1)
    cfg = {"encoder": {"class_path": "rsgm.components.encoders.SmallConvEncoder", "init_args": {"width": 32, "rep_dim": 64}},
           "encoder_weights": str(tmp / "enc.pt"), "input_shape": [1, 16, 16], "max_batch": 256,
           "state_path": str(tmp / "state.sqlite"), "secret_file": str(tmp / "secret.bin"),
           "api_keys": {f"key-{i}": f"user-{i}" for i in range(n_keys)}, "max_connections": 4 * n_keys + 16,
           "defense": {"lam": 1e-6, "alpha": 10.0, "beta": 0.036, "transform": "affine"}, "batch_size": 16}
    (tmp / "serve.yaml").write_text(yaml.safe_dump(cfg))
    import json

    body = json.dumps({"inputs": torch.rand(args.inputs, 1, 16, 16).tolist()}).encode()
    settings = [("bare encoder", ["--no-defense"]), ("B4B, SQLite", [])]
    pg = None
    if not args.skip_postgres:
        try:
            from postgres_server import LocalPostgres

            pg = LocalPostgres()
            settings.append(("B4B, PostgreSQL", ["--state.url", pg.url]))
        except BaseException as e:  # pytest.skip raises a BaseException subclass
            print(f"PostgreSQL skipped: {e}")
    rows, nrows = [], []
    try:
        for name, extra in settings if args.clients else []:
            proc, addr = start_server(tmp / "serve.yaml", *extra)
            try:
                asyncio.run(load(addr, 1, 1.0, body))  # warm-up
                for c in args.clients:
                    rps, p50, p99, err = asyncio.run(load(addr, c, args.seconds, body))
                    rows.append((name, c, rps, p50, p99, err))
                    print(f"{name:18s} clients {c:3d}: {rps:8.1f} req/s  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  errors {err}", flush=True)
            finally:
                stop_server(proc)
        if args.new_users > 0:
            print(f"\nnew users at dim {args.new_user_dim} (load average {os.getloadavg()[0]:.1f}):")
            nrows = new_user_cost(args.new_user_dim, args.new_users, args.cache_size)
            nrows += new_user_http(args.new_user_dim, args.new_users, tmp)
            if pg is not None:
                nrows += new_user_http(args.new_user_dim, args.new_users, tmp, ("--state.url", pg.url), "HTTP, PostgreSQL")
    finally:
        if pg is not None:
            pg.stop()
    if rows:
        print(f"\n{args.inputs} images per request, {args.seconds:g} s per cell, 1 inference worker:")
        print("| server | clients | requests/s | images/s | p50 ms | p99 ms | errors |")
        print("|---|---|---|---|---|---|---|")
    for name, c, rps, p50, p99, err in rows:
        print(f"| {name} | {c} | {rps:.1f} | {rps * args.inputs:.0f} | {p50:.1f} | {p99:.1f} | {err} |")
    bare = {c: rps for name, c, rps, *_ in rows if name == "bare encoder"}
    for name, c, rps, *_ in rows:
        if name != "bare encoder" and bare.get(c):
            print(f"{name}, {c} clients: {100 * rps / bare[c]:.0f} % of the bare encoder's throughput")
    if nrows:
        print_new_user_table(args.new_user_dim, args.new_users, nrows)


if __name__ == "__main__":
    main()
