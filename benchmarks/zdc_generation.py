"""Time and peak memory to simulate ZDC responses with rsgm's generators.

For every detector, generator width and batch size it generates ``--n`` responses in
``torch.inference_mode`` (each configuration in a fresh process, so peak memory is its
own) and prints seconds per 10,000 responses, peak extra memory, the generator's FLOPs
per sample, the achieved GFLOP/s, and this machine's measured fp32 matmul GFLOP/s, so the
gap to the hardware limit is visible.

    python benchmarks/zdc_generation.py                       # CPU, both detectors
    python benchmarks/zdc_generation.py --device cuda --batch-sizes 1024 8192
    python benchmarks/zdc_generation.py --model expertsim --n 10000   # 1-5 experts (thesis Table 5.5.4)

With ``--model expertsim`` each configuration is an ExpertSim with ``--n-experts`` experts
(untrained weights: the cost does not depend on them). Every batch is routed and each
expert generates its routed sub-batch in one call; the table adds the router's own time
and its share of the total.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from rsgm.components.gan import PeakRegressor, ZDCDiscriminator, ZDCGenerator


def matmul_gflops(device: str, size: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * size**3 * reps / (time.perf_counter() - start) / 1e9


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def flops_per_sample(generator: torch.nn.Module, device: str) -> float:
    z, c = torch.randn(8, generator.noise_dim, device=device), torch.randn(8, generator.cond_dim, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        generator(z, c)
    return counter.get_total_flops() / 8


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_one(detector: str, width: float, batch_size: int, n: int, device: str, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    generator = ZDCGenerator(detector, width=width).to(device).eval()
    flops = flops_per_sample(generator, device)
    cond = torch.randn(n, generator.cond_dim, device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    baseline = peak_memory_mb(device)
    with torch.inference_mode():
        generator(torch.randn(min(batch_size, n), generator.noise_dim, device=device), cond[:batch_size])  # warm-up
        sync(device)
        start = time.perf_counter()
        for i in range(0, n, batch_size):
            c = cond[i:i + batch_size]
            generator(torch.randn(len(c), generator.noise_dim, device=device), c)
        sync(device)
        seconds = time.perf_counter() - start
    queue.put({"detector": detector, "width": width, "batch": batch_size, "n": n, "seconds": seconds,
               "peak_mb": peak_memory_mb(device) - baseline, "gflop_per_sample": flops / 1e9})


def run_expertsim(detector: str, width: float, batch_size: int, n: int, n_experts: int, device: str, threads: int,
                  queue) -> None:
    from rsgm.lightning_modules.expertsim import ExpertSim

    torch.set_num_threads(threads)
    model = ExpertSim(ZDCGenerator(detector, width=width), ZDCDiscriminator(detector), PeakRegressor(detector),
                      n_experts=n_experts).to(device).eval()
    flops = flops_per_sample(model.experts[0].generator, device)
    cond = torch.randn(n, model.router.cond_dim, device=device)
    gen = torch.Generator().manual_seed(0)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    baseline = peak_memory_mb(device)
    with torch.inference_mode():
        model.simulate(cond[:batch_size], gen)  # warm-up
        sync(device)
        start = time.perf_counter()
        for i in range(0, n, batch_size):
            model.simulate(cond[i:i + batch_size], gen)
        sync(device)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(0, n, batch_size):
            model.route(cond[i:i + batch_size], gen)
        sync(device)
        router_seconds = time.perf_counter() - start
    queue.put({"detector": detector, "width": width, "batch": batch_size, "n": n, "seconds": seconds,
               "router_seconds": router_seconds, "n_experts": n_experts,
               "peak_mb": peak_memory_mb(device) - baseline, "gflop_per_sample": flops / 1e9})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["generator", "expertsim"], default="generator")
    parser.add_argument("--n-experts", nargs="+", type=int, default=[1, 2, 3, 4, 5], help="with --model expertsim")
    parser.add_argument("--detectors", nargs="+", default=["neutron", "proton"])
    parser.add_argument("--widths", nargs="+", type=float, default=[1.0, 0.125],
                        help="generator widths: 1.0 is the thesis-size network")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--n", type=int, default=10_000, help="responses per configuration")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    peak = matmul_gflops(args.device)
    print(f"device {args.device}, {args.threads} threads; measured fp32 matmul (2048^2): {peak:.0f} GFLOP/s")
    experts = args.n_experts if args.model == "expertsim" else [None]
    extra = f" {'experts':>7} {'router s/10k':>12} {'router %':>8}" if args.model == "expertsim" else ""
    header = f"{'detector':<8} {'width':>5} {'batch':>6}{extra} {'s/10k':>8} {'peak MB':>8} {'GFLOP/sample':>12} {'GFLOP/s':>8} {'% matmul':>8}"
    print(header)
    print("-" * len(header))
    ctx = mp.get_context("spawn")
    for detector in args.detectors:
        for width in args.widths:
            for batch in args.batch_sizes:
                for n_experts in experts:
                    queue = ctx.Queue()
                    if n_experts is None:
                        target, targs = run_one, (detector, width, batch, args.n, args.device, args.threads, queue)
                    else:
                        target, targs = run_expertsim, (detector, width, batch, args.n, n_experts, args.device, args.threads, queue)
                    proc = ctx.Process(target=target, args=targs)
                    proc.start()
                    r = queue.get()
                    proc.join()
                    scale = 10_000 / r["n"]
                    rate = r["gflop_per_sample"] * r["n"] / r["seconds"]
                    extra = (f" {n_experts:>7} {r['router_seconds'] * scale:>12.3f} {100 * r['router_seconds'] / r['seconds']:>7.2f}%"
                             if n_experts is not None else "")
                    print(f"{detector:<8} {width:>5.3g} {batch:>6}{extra} {r['seconds'] * scale:>8.1f} {r['peak_mb']:>8.0f} "
                          f"{r['gflop_per_sample']:>12.3f} {rate:>8.1f} {100 * rate / peak:>7.0f}%", flush=True)


if __name__ == "__main__":
    main()
