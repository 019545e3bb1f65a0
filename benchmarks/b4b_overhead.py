"""B4B defence overhead: cost per batch of (hash + coverage update + store write + noise + transform)
against the encoder forward on the same batch, and LSH-update throughput.

    python benchmarks/b4b_overhead.py [--threads 1] [--reps 5] [--skip-resnet]

Encoders use random weights (timing does not depend on them).  Prints a table.
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


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 1 thread: on a shared or small CPU, OpenMP spin-waits make tiny matmuls erratic with more
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-resnet", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = [("testbed CNN, 1x16x16", SmallConvEncoder(width=32, rep_dim=64), (256, 1, 16, 16))]
    if not args.skip_resnet:
        cases.append(("ResNet-50, 3x224x224", ResNet50(), (32, 3, 224, 224)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, enc, shape) in enumerate(cases):
            enc.eval()
            x = torch.randn(*shape)
            with torch.no_grad():
                t_fwd = timed(lambda: enc(x), args.reps)
                r = enc(x)
            defense = B4BDefense(r.shape[1], Path(tmp) / f"s{i}.sqlite", b"benchmark-secret-0123456789", transform="affine", noise_seed=0)
            users = iter(range(10**9))
            # a fresh user per call, so every call pays the full new-user path (transform derivation)
            t_def = timed(lambda: defense.respond(f"u{next(users)}", r), args.reps)
            t_def_known = timed(lambda: defense.respond("steady", r), args.reps)
            rows.append((name, shape[0], t_fwd * 1e3, t_def * 1e3, t_def_known * 1e3, 100 * t_def_known / t_fwd))
    print(f"{'encoder':24s} {'batch':>5s} {'forward ms':>11s} {'defence ms (new user)':>22s} {'defence ms':>11s} {'overhead %':>11s}")
    for name, b, f, dn, dk, pct in rows:
        print(f"{name:24s} {b:5d} {f:11.2f} {dn:22.2f} {dk:11.2f} {pct:11.2f}")
    for dim in (64, 2048):
        lsh = LSHCoverage(dim)
        state = lsh.empty_state()
        reps = torch.randn(4096, dim)
        t = timed(lambda: lsh.mark(state, lsh.bucket_ids(reps)), args.reps)
        print(f"LSH update alone (20 x 12 bits, dim {dim}): {4096 / t:,.0f} embeddings/s")


if __name__ == "__main__":
    main()
