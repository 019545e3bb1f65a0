"""CDI speed: network evaluations per sample, seconds per 64 samples per feature, statistics.

    python benchmarks/cdi_speed.py                 # statistics only, short: |P| = 10, 100, 200 trials
    python benchmarks/cdi_speed.py --full          # |P| = 10 ... 1000, 1000 trials, default and thesis procedures
    python benchmarks/cdi_speed.py --full --device cuda   # the same, CPU and GPU side by side
    python benchmarks/cdi_speed.py --features --dit models/DiT-XL-2-256 --device cuda   # feature timings too

Tables:
1. (``--features``) network rows evaluated per sample per feature (forward passes; the
   white-box features also run as many backward passes) against the minimum the definition
   needs, and seconds per batch of 64 samples per feature (Table C.9.1's unit);
2. time of the batched resampling statistics on each device vs the straightforward sklearn
   loop (timed on ``--loop_trials`` trials, scaled to ``--trials``), with the largest p-value
   difference against the loop run to convergence (tol 1e-8) on the same splits.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from rsgm.privacy import stats as S
from rsgm.privacy.diffusion_features import ACCESS, DiffusionFeatureExtractor, FeatureConfig, minimum_rows_per_sample


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


def stats_table(trials: int, loop_trials: int, sizes: list[int], d: int, devices: list[str], procedures: list[str]) -> None:
    """Batched statistics on each device vs the straightforward sklearn loop on the same splits."""
    rng = np.random.default_rng(0)
    members = torch.from_numpy(rng.normal(0.05, 1, (2000, d)))
    nonmembers = torch.from_numpy(rng.normal(0, 1, (2000, d)))
    print(f"\nResampling statistics: {trials} trials per |P| (|U| = |P|), {d} features, torch threads {torch.get_num_threads()}; "
          f"the sklearn loop (StandardScaler + LogisticRegression per fold model, scipy Welch) timed on {loop_trials} trials and scaled to {trials}")
    head = "".join(f"{dev + ' s':>12}{'x loop':>8}" for dev in devices)
    print(f"{'procedure':<22}{'|P|':>6}{'loop s':>10}{head}{'max |dp|':>11}")
    for proc in procedures:
        k = S.make_procedure(proc).folds
        for n in sizes:
            draw = S.draw_trials(2000, 2000, n, n, trials, k=k, seed=n)
            S.loop_cdi(members, nonmembers, draw[:1], procedure=proc)  # warm-up: imports
            t0 = time.perf_counter()
            S.loop_cdi(members, nonmembers, draw[:loop_trials], procedure=proc)
            t_loop = (time.perf_counter() - t0) * trials / loop_trials
            exact = S.loop_cdi(members, nonmembers, draw[:loop_trials], tol=1e-8, procedure=proc)  # same splits, converged
            cells, diff = "", 0.0
            for dev in devices:
                S.batched_cdi(members, nonmembers, draw[:2], device=dev, procedure=proc)  # warm-up
                sync(dev)
                t0 = time.perf_counter()
                fast = S.batched_cdi(members, nonmembers, draw, device=dev, procedure=proc)["p"].numpy()
                sync(dev)
                t = time.perf_counter() - t0
                cells += f"{t:>12.2f}{t_loop / t:>8.1f}"
                diff = max(diff, float(np.abs(fast[:loop_trials] - exact).max()))
            print(f"{proc:<22}{n:>6}{t_loop:>10.1f}{cells}{diff:>11.1e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--digits", default="models/dm_digits")
    ap.add_argument("--dit", default=None, help="saved DiTPipeline folder; measured when given")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="statistics (and features) also on this device; with cuda, CPU and GPU are timed in one run")
    ap.add_argument("--features", action="store_true", help="also time the feature extraction (needs the digits model or builds an untrained one)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="the full sizes: |P| = 10, 30, 100, 300, 1000, 1000 trials, both procedures")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--loop_trials", type=int, default=10)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--procedures", nargs="+", default=[S.DEFAULT_PROCEDURE])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.full:
        args.sizes, args.trials, args.loop_trials, args.procedures = [10, 30, 100, 300, 1000], 1000, 20, [S.DEFAULT_PROCEDURE, "crossfit"]
    torch.set_num_threads(args.threads)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}")

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
    stats_table(args.trials, args.loop_trials, args.sizes, 26, devices, args.procedures)


if __name__ == "__main__":
    main()
