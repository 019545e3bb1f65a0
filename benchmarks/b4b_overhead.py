"""B4B defence overhead: cost per batch of (hash + coverage update + store write + noise + transform)
against the encoder forward on the same batch, and LSH-update throughput.

    python benchmarks/b4b_overhead.py [--threads 1] [--reps 5] [--skip-resnet] [--device cuda]

Encoders use random weights (timing does not depend on them).  Prints a table: the bare encoder
batch, the defence for a new and a known user, and the defended share of the time.  With
``--device cuda`` the encoders run on the GPU (timed with synchronisation); the defence's
hashing, noise and transform follow the representations there, the store stays on the CPU.
Then the LSH update (hash + mark) in fp32 and bf16 at 64 and 2048 dims, and how far the bf16
coverage is from the fp32 one for 20 simulated users.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rsgm.components.encoders import ResNet50, SmallConvEncoder
from rsgm.defenses.b4b import B4BDefense
from rsgm.defenses.lsh import LSHCoverage


def timed(fn, reps: int, device: str = "cpu") -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()  # warm-up
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 1 thread: on a shared or small CPU, OpenMP spin-waits make tiny matmuls erratic with more
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    dev = args.device
    torch.set_num_threads(args.threads)
    cases = [("testbed CNN, 1x16x16", SmallConvEncoder(width=32, rep_dim=64), (256, 1, 16, 16))]
    if not args.skip_resnet:
        cases.append(("ResNet-50, 3x224x224", ResNet50(), (32 if dev == "cpu" else 256, 3, 224, 224)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, enc, shape) in enumerate(cases):
            enc.eval().to(dev)
            x = torch.randn(*shape, device=dev)
            with torch.no_grad():
                t_fwd = timed(lambda: enc(x), args.reps, dev)
                r = enc(x)
            defense = B4BDefense(r.shape[1], Path(tmp) / f"s{i}.sqlite", b"benchmark-secret-0123456789", transform="affine")
            users = iter(range(10**9))
            # a fresh user per call, so every call pays the full new-user path (transform derivation)
            t_def = timed(lambda: defense.respond(f"u{next(users)}", r), args.reps, dev)
            t_def_known = timed(lambda: defense.respond("steady", r), args.reps, dev)
            rows.append((name, shape[0], t_fwd * 1e3, t_def * 1e3, t_def_known * 1e3, 100 * t_def_known / t_fwd))
    print(f"device {dev}, {torch.get_num_threads()} CPU thread(s)")
    print(f"{'encoder':24s} {'batch':>5s} {'forward ms':>11s} {'defence ms (new user)':>22s} {'defence ms':>11s} {'overhead %':>11s}")
    for name, b, f, dn, dk, pct in rows:
        print(f"{name:24s} {b:5d} {f:11.2f} {dn:22.2f} {dk:11.2f} {pct:11.2f}")
    for dim in (64, 2048):
        reps = torch.randn(4096, dim)
        for prec in ("fp32", "bf16"):
            lsh = LSHCoverage(dim, precision=prec)
            state = lsh.empty_state()
            t = timed(lambda: lsh.mark(state, lsh.bucket_ids(reps)), args.reps)
            print(f"LSH update alone (20 x 12 bits, dim {dim}, {prec}): {4096 / t:,.0f} embeddings/s")
        # coverage of 20 users (100 to 2000 queries each around their own centre), bf16 vs fp32
        g = torch.Generator().manual_seed(0)
        worst_rel, worst_abs = 0.0, 0.0
        for u in range(20):
            n = 100 + 100 * u
            r = torch.randn(1, dim, generator=g) + 0.7 * torch.randn(n, dim, generator=g)
            cov = {}
            for prec in ("fp32", "bf16"):
                lsh = LSHCoverage(dim, precision=prec)
                st = lsh.empty_state()
                lsh.mark(st, lsh.bucket_ids(r))
                cov[prec] = lsh.coverage(st)
            worst_abs = max(worst_abs, abs(cov["bf16"] - cov["fp32"]))
            worst_rel = max(worst_rel, abs(cov["bf16"] - cov["fp32"]) / cov["fp32"])
        print(f"  bf16 vs fp32 coverage over 20 users at dim {dim}: worst relative difference {100 * worst_rel:.3f} %, "
              f"worst absolute {worst_abs:.2e}")

if __name__ == "__main__":
    main()
