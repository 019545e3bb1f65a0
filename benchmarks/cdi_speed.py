"""CDI speed: network evaluations per sample, seconds per 64 samples per feature, statistics.

    python benchmarks/cdi_speed.py                      # built-in digits target (models/dm_digits)
    python benchmarks/cdi_speed.py --dit models/DiT-XL-2-256 --device cuda   # also DiT-256

Prints three tables:
1. network rows evaluated per sample per feature (forward passes; the white-box features
   also run as many backward passes) against the minimum the definition needs;
2. seconds per batch of 64 samples per feature (Table C.9.1's unit);
3. time of the batched resampling statistics vs the straightforward sklearn loop, with the
   largest p-value difference between them (the loop runs on ``--loop_trials`` trials and
   is extrapolated linearly to 1000).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from rsgm.datamodules.membership import digits_images
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


def stats_table(loop_trials: int, sizes: list[int], d: int, device: str) -> None:
    rng = np.random.default_rng(0)
    members = torch.from_numpy(rng.normal(0.05, 1, (2000, d)))
    nonmembers = torch.from_numpy(rng.normal(0, 1, (2000, d)))
    print(f"\nResampling statistics: 1000 trials per |P|, 5-fold cross-fitting, {d} features, batched on {device}")
    print(f"{'|P|':>6}{'batched s':>11}{'loop s (x1000)':>16}{'speed-up':>10}{'max |dp|':>11}")
    for n in sizes:
        draw = S.draw_trials(2000, 2000, n, n, 1000, seed=n)
        S.batched_cdi(members, nonmembers, S.TrialDraw(*(v[:2] for v in (draw.idx_p, draw.idx_u, draw.fold_p, draw.fold_u))), device=device)
        sync(device)
        t0 = time.perf_counter()
        fast = S.batched_cdi(members, nonmembers, draw, device=device)["p"].numpy()
        sync(device)
        t_fast = time.perf_counter() - t0
        sub = S.TrialDraw(draw.idx_p[:loop_trials], draw.idx_u[:loop_trials], draw.fold_p[:loop_trials], draw.fold_u[:loop_trials])
        S.loop_cdi(members, nonmembers, S.TrialDraw(*(v[:1] for v in (draw.idx_p, draw.idx_u, draw.fold_p, draw.fold_u))))  # warm-up: imports
        t0 = time.perf_counter()
        slow = S.loop_cdi(members, nonmembers, sub)
        t_slow = (time.perf_counter() - t0) * 1000 / loop_trials
        print(f"{n:>6}{t_fast:>11.2f}{t_slow:>16.1f}{t_slow / t_fast:>10.1f}{np.abs(fast[:loop_trials] - slow).max():>11.2e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--digits", default="models/dm_digits")
    ap.add_argument("--dit", default=None, help="saved DiTPipeline folder; measured when given")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--loop_trials", type=int, default=20)
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 300, 1000])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}")

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

    stats_table(args.loop_trials, args.sizes, d=26, device=args.device)


if __name__ == "__main__":
    main()
