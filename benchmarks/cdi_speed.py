"""CDI speed: network evaluations per sample, seconds per 64 samples per feature, statistics.

    python benchmarks/cdi_speed.py                 # statistics: |P| = 10, 100, 1000, 1000 trials, default, thesis, permutation
    python benchmarks/cdi_speed.py --trials 200 --sizes 10 100   # shorter
    python benchmarks/cdi_speed.py --device cuda   # the same, CPU and GPU side by side
    python benchmarks/cdi_speed.py --features --dit models/DiT-XL-2-256 --device cuda   # feature timings too

Tables:
1. (``--features``) network rows evaluated per sample per feature (forward passes; the
   white-box features also run as many backward passes) against the minimum the definition
   needs, and seconds per batch of 64 samples per feature (Table C.9.1's unit);
2. time of the batched resampling statistics on each device vs the straightforward sklearn
   loop on the same splits (timed on ``--loop_trials`` trials, scaled to ``--trials``), with
   the largest p-value difference against the loop run to convergence (tol 1e-8). Rows: the
   default procedure, the thesis' crossfit, and the exact permutation test (one (P, U) case,
   ``--trials`` relabelings; the difference is over the relabelings' parametric p-values).

Timing on a shared CPU: the loop and the batched solver are timed in turn, ``--stat_repeats``
rounds per row (medians shown), and the load average is printed with every row, so the ratio,
not the seconds, is the result.
The sklearn loop runs with its BLAS at one thread (on a loaded machine two BLAS threads made
it up to ten times slower, which would flatter the ratio); torch uses ``--threads`` threads
with ``OMP_WAIT_POLICY=PASSIVE`` (set here unless given: busy-waiting OpenMP threads on an
oversubscribed CPU made the batched solver up to ten times slower).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP threads

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rsgm.privacy import stats as S  # noqa: E402
from rsgm.privacy.diffusion_features import ACCESS, DiffusionFeatureExtractor, FeatureConfig, minimum_rows_per_sample  # noqa: E402


def digits_target(path: str):
    from rsgm.components.diffusion_adapters import PixelUNetTarget

    if Path(path).is_dir():
        return PixelUNetTarget(path=path).load(), f"trained ({path})"
    from rsgm.lightning_modules.diffusion import ClassConditionalDiffusion

    m = ClassConditionalDiffusion()
    return PixelUNetTarget(unet=m.unet, alphas_cumprod=m.alphas_cumprod), "untrained, same architecture (train with rsgm fit --config configs/dm_digits.yaml)"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def feature_table(target, x, cond, device: str, repeats: int, max_batch: int = 4096) -> list[tuple]:
    rows = []
    index = torch.arange(x.shape[0])
    for name in ACCESS:
        cfg = FeatureConfig(features=[name], max_batch=max_batch)
        ext = DiffusionFeatureExtractor(cfg)
        ext(target, x, cond, index)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            ext(target, x, cond, index)
        sync(device)
        rows.append((name, ACCESS[name], ext.rows_per_sample[name], minimum_rows_per_sample(cfg)[name], (time.perf_counter() - t0) / repeats))
    return rows


def print_features(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}")
    print(f"{'feature':<8}{'access':<8}{'rows/sample':>12}{'minimum':>9}{'s / 64 samples':>16}")
    for name, access, rows_, minimum, sec in rows:
        print(f"{name:<8}{access:<8}{rows_:>12.1f}{minimum:>9}{sec:>16.3f}")


def _timed(fn):
    """(result, wall seconds, CPU seconds of this process, all threads)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def previous_solver(draw, n: int) -> str:
    """The solver ``batched_cdi`` picked before the trial solver: pool when a trial uses at
    least ``POOL_ABOVE`` of the rows the trials draw from, else gather (Newton's method)."""
    pool_rows = S.rows_used(draw, int(max(draw.idx_p.max(), draw.idx_u.max())) + 1)
    return "pool" if n >= S.POOL_ABOVE * pool_rows else "gather"


def stats_table(trials: int, loop_trials: int, sizes: list[int], d: int, devices: list[str], procedures: list[str],
                permutation: bool = True, compare: bool = True, repeats: int = 3) -> list[tuple]:
    """Batched statistics on each device vs the straightforward sklearn loop on the same splits
    (and, with ``compare``, the previous batched solver on CPU, timed in the same run)."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    members = torch.from_numpy(rng.normal(0.05, 1, (2000, d)))
    nonmembers = torch.from_numpy(rng.normal(0, 1, (2000, d)))
    print(f"\nResampling statistics: {trials} trials per |P| (|U| = |P|; P from 2000 members, U from 2000 non-members), {d} features, "
          f"torch threads {torch.get_num_threads()}; the sklearn loop (StandardScaler + LogisticRegression per fold model, "
          f"scipy Welch; BLAS 1 thread) timed on {loop_trials} trials and scaled to {trials}; medians of {repeats} rounds, "
          f"the loop and the batched statistics timed in turn")
    head = "".join(f"{dev + ' wall':>10}{'x loop':>8}{dev + ' cpu':>9}{'x loop':>8}" for dev in devices)
    print("(seconds: wall clock and CPU time of the process, all threads; 'x loop' is the loop's over the batched)")
    if compare:
        print("'prev': the previous batched solver (pool / gather) on CPU, same splits; 'x prev': its time over the current one's")
        head += f"{'prev':>7}{'solver':>7}{'prev wall':>10}{'x prev':>7}{'prev cpu':>9}{'x prev':>7}"
    print(f"{'procedure':<24}{'|P|':>6}{'loop wall':>10}{'loop cpu':>9}{head}{'max |dp|':>11}{'load':>7}")
    rows = []
    cases = [(proc, n) for proc in procedures for n in sizes] + ([("permutation", n) for n in sizes] if permutation else [])
    for proc, n in cases:
        if proc == "permutation":  # one (P, U) case, `trials` relabelings of P u U (the first one observed)
            name, k = S.DEFAULT_PROCEDURE, S.make_procedure(S.DEFAULT_PROCEDURE).folds
            pool = torch.cat([members[:n], nonmembers[:n]])
            draw = S.permutation_draw(n, n, trials - 1, k, seed=n)
            mem, non = pool, pool[:0]
        else:
            name, k = proc, S.make_procedure(proc).folds
            draw = S.draw_trials(2000, 2000, n, n, trials, k=k, seed=n)
            mem, non = members, nonmembers
        with threadpool_limits(1):
            S.loop_cdi(mem, non, draw[:1], procedure=name)  # warm-up: imports
            exact = S.loop_cdi(mem, non, draw[:loop_trials], tol=1e-8, procedure=name)  # same splits, converged
        for dev in devices:
            S.batched_cdi(mem, non, draw[:2], device=dev, procedure=name)  # warm-up
            sync(dev)
        # `repeats` rounds, the loop and each device in turn; the medians
        loops, fasts = [], {dev: [] for dev in devices}
        for _ in range(repeats):
            with threadpool_limits(1):
                loops.append(_timed(lambda: S.loop_cdi(mem, non, draw[:loop_trials], procedure=name))[1:])
            for dev in devices:
                fasts[dev].append(_timed(lambda: (S.batched_cdi(mem, non, draw, device=dev, procedure=name), sync(dev))[0]))
        t_loop, c_loop = (float(np.median([v[i] for v in loops])) * trials / loop_trials for i in (0, 1))
        cells, diff, cpu_times = "", 0.0, None
        for dev in devices:
            res = fasts[dev][0][0]
            t, c = (float(np.median([v[i] for v in fasts[dev]])) for i in (1, 2))
            fast = res["p"].numpy()
            cells += f"{t:>10.2f}{t_loop / t:>8.1f}{c:>9.2f}{c_loop / c:>8.1f}"
            diff = max(diff, float(np.abs(fast[:loop_trials] - exact).max()))
            rows.append((proc, n, t_loop, dev, t, t_loop / t, c_loop / c, diff))
            cpu_times = cpu_times or (t, c)
        if compare:
            prev = previous_solver(draw, 2 * n)
            S.batched_cdi(mem, non, draw[:2], procedure=name, solver=prev)  # warm-up
            res_p, tp, cp = _timed(lambda: S.batched_cdi(mem, non, draw, procedure=name, solver=prev))
            cells += f"{'':>7}{prev:>7}{tp:>10.2f}{tp / cpu_times[0]:>7.1f}{cp:>9.2f}{cp / cpu_times[1]:>7.1f}"
            diff = max(diff, float(np.abs(res_p["p"].numpy()[:loop_trials] - exact).max()))
        print(f"{proc:<24}{n:>6}{t_loop:>10.1f}{c_loop:>9.1f}{cells}{diff:>11.1e}{os.getloadavg()[0]:>7.1f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--digits", default="models/dm_digits")
    ap.add_argument("--dit", default=None, help="saved DiTPipeline folder; measured when given")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="statistics (and features) also on this device; with cuda, CPU and GPU are timed in one run")
    ap.add_argument("--features", action="store_true", help="also time the feature extraction (needs the digits model or builds an untrained one)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="also |P| = 30 and 300")
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--loop_trials", type=int, default=20)
    ap.add_argument("--stat_repeats", type=int, default=3, help="rounds of (loop, batched) timings per row; the medians are shown")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--procedures", nargs="+", default=[S.DEFAULT_PROCEDURE, "sequential_stratified", "crossfit"])
    ap.add_argument("--no_permutation", action="store_true", help="skip the permutation-test rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no_compare", action="store_true", help="skip timing the previous batched solver")
    args = ap.parse_args()
    if args.full:
        args.sizes = sorted(set(args.sizes) | {10, 30, 100, 300, 1000})
    torch.set_num_threads(args.threads)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    if args.features:
        from rsgm.datamodules.membership import digits_images

        target, what = digits_target(args.digits)
        x, y = digits_images()
        print_features(f"Built-in digits DM, {what}, batch of 64", feature_table(target.to(args.device), x[:64].to(args.device), y[:64].to(args.device), args.device, args.repeats))

    if args.dit:
        from rsgm.components.diffusion_adapters import DiTTarget

        dit = DiTTarget(args.dit).load().to(args.device)
        g = torch.Generator().manual_seed(0)
        xs = (torch.rand(64, 3, 256, 256, generator=g) * 2 - 1).to(args.device)
        cls = torch.randint(0, 1000, (64,), generator=g).to(args.device)
        print_features(f"DiT-256 ({args.dit}), batch of 64", feature_table(dit, xs, cls, args.device, 1, max_batch=256))

    devices = ["cpu"] + ([args.device] if args.device != "cpu" else [])
    stats_table(args.trials, args.loop_trials, args.sizes, 26, devices, args.procedures, not args.no_permutation, not args.no_compare,
                args.stat_repeats)


if __name__ == "__main__":
    main()
