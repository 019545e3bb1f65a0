"""Throughput and latency of ``rsgm serve`` under concurrent clients over loopback, and the cost
of a new user.

    python benchmarks/b4b_serving.py [--clients 1 16 64] [--seconds 5] [--inputs 8] [--skip-postgres]
                                     [--new-users 2000] [--new-user-dim 2048]

Servers (each a real ``rsgm serve`` process on 127.0.0.1, the testbed CNN with random weights,
1 inference worker, 1 thread): the bare encoder (``--no-defense``), B4B with SQLite state, and
B4B with PostgreSQL state (a throw-away local server; skipped without the binaries).  Every
client has its own API key (so batches mix users) and sends requests of ``--inputs`` images
back to back for ``--seconds``.  Prints requests/s, p50 and p99 latency per setting, and the
defended/bare throughput ratio.  Then, in-process at ``--new-user-dim``: time of a new user's
first answer (transform derivation + first state row) against a known user's, and resident
memory after ``--new-users`` users (the transform cache is an LRU of ``cache_size``).
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


def new_user_cost(dim: int, n_users: int, cache_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = B4BDefense(dim, Path(tmp) / "s.sqlite", b"benchmark-secret-0123456789", cache_size=cache_size)
        r = torch.randn(1, dim)
        d.respond("warm-up", r)
        known = statistics.median([_t(lambda: d.respond("warm-up", r)) for _ in range(20)])
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        times = []
        t_all = time.perf_counter()
        for i in range(n_users):
            times.append(_t(lambda: d.respond(f"user-{i}", r)))
        t_all = time.perf_counter() - t_all
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        transform_only = statistics.median([_t(lambda: d.transform_for(f"fresh-{i}")) for i in range(200)])
    times.sort()
    print(f"\nnew users at dim {dim} (cache_size {cache_size}), {n_users} users in {t_all:.1f} s:")
    print(f"  first answer of a new user: median {1e3 * times[len(times) // 2]:.2f} ms, p99 {1e3 * times[int(0.99 * len(times))]:.2f} ms "
          f"(known user {1e3 * known:.2f} ms); transform derivation alone {1e3 * transform_only:.3f} ms")
    print(f"  peak RSS {rss0:.0f} MiB before, {rss1:.0f} MiB after {n_users} users; transforms cached: {len(d._transforms)}")


def _t(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
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
    n_keys = max(args.clients)
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
    rows = []
    try:
        for name, extra in settings:
            proc, addr = start_server(tmp / "serve.yaml", *extra)
            try:
                asyncio.run(load(addr, 1, 1.0, body))  # warm-up
                for c in args.clients:
                    rps, p50, p99, err = asyncio.run(load(addr, c, args.seconds, body))
                    rows.append((name, c, rps, p50, p99, err))
                    print(f"{name:18s} clients {c:3d}: {rps:8.1f} req/s  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  errors {err}", flush=True)
            finally:
                stop_server(proc)
    finally:
        if pg is not None:
            pg.stop()
    print(f"\n{args.inputs} images per request, {args.seconds:g} s per cell, 1 inference worker:")
    print("| server | clients | requests/s | images/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for name, c, rps, p50, p99, err in rows:
        print(f"| {name} | {c} | {rps:.1f} | {rps * args.inputs:.0f} | {p50:.1f} | {p99:.1f} | {err} |")
    bare = {c: rps for name, c, rps, *_ in rows if name == "bare encoder"}
    for name, c, rps, *_ in rows:
        if name != "bare encoder" and bare.get(c):
            print(f"{name}, {c} clients: {100 * rps / bare[c]:.0f} % of the bare encoder's throughput")
    if args.new_users > 0:
        new_user_cost(args.new_user_dim, args.new_users, args.cache_size)


if __name__ == "__main__":
    main()
