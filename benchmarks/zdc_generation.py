"""Eager against compiled generation of ZDC responses, in one run.

For each generator width (1.0 = thesis size, 0.125 = compact) it times the generation path
that ``rsgm predict`` and the evaluation use (``simulate``: noise, routing, generator(s),
photon counts, in ``torch.inference_mode``) for a single conditional GAN and for ExpertSim
with 1-5 experts, once eager and once with ``compile_generator=True`` (``torch.compile``,
dynamic batch size). Each configuration runs in a fresh process. Printed per row: seconds
per 10,000 responses, the compiled speed-up, the compilation time (first call, excluded
from the timing), the router's share of the time (ExpertSim), the generator's FLOPs per
sample, the achieved GFLOP/s and its share of this machine's measured fp32 matmul
throughput, and the load average (the machine may be shared).

    python benchmarks/zdc_generation.py                        # short CPU default (--n 2000)
    python benchmarks/zdc_generation.py --device cuda --n 100000 --batch-size 8192
    python benchmarks/zdc_generation.py --n 10000 --threads 2 --experts 1 2 3 4 5

Weights are untrained (the cost does not depend on them).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from rsgm.components.gan import PeakRegressor, ZDCDiscriminator, ZDCGenerator


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_gflops(device: str, size: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * size**3 * reps / (time.perf_counter() - start) / 1e9


def flops_per_sample(generator: torch.nn.Module, device: str) -> float:
    z, c = torch.randn(8, generator.noise_dim, device=device), torch.randn(8, generator.cond_dim, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        generator(z, c)
    return counter.get_total_flops() / 8


def build(kind: str, detector: str, width: float, n_experts: int, compiled: bool, device: str):
    from rsgm.lightning_modules.expertsim import ExpertSim
    from rsgm.lightning_modules.sdi_gan import ConditionalGAN

    parts = ZDCGenerator(detector, width=width), ZDCDiscriminator(detector), PeakRegressor(detector)
    if kind == "gan":
        return ConditionalGAN(*parts, compile_generator=compiled).to(device).eval()
    return ExpertSim(*parts, n_experts=n_experts, compile_generator=compiled).to(device).eval()


def run_one(kind: str, detector: str, width: float, n_experts: int, compiled: bool, batch: int, n: int, device: str,
            threads: int, queue) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build(kind, detector, width, n_experts, compiled, device)
    generator = model.generator if kind == "gan" else model.experts[0].generator
    flops = flops_per_sample(generator, device)
    cond = torch.randn(n, generator.cond_dim, device=device)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    with torch.inference_mode():
        # Warm-up: compiles (every expert, and a short last batch) when compiled.
        model.simulate(cond[:batch], gen)
        model.simulate(cond[:max(2, batch // 3)], gen)
        sync(device)
        warmup = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(0, n, batch):
            model.simulate(cond[i:i + batch], gen)
        sync(device)
        seconds = time.perf_counter() - start
        router = 0.0
        if kind == "expertsim":
            start = time.perf_counter()
            for i in range(0, n, batch):
                model.route(cond[i:i + batch], gen)
            sync(device)
            router = time.perf_counter() - start
    fell_back = compiled and any(getattr(m, "_compiled", None) is not None and m._compiled.failed
                                 for m in ([model] if kind == "gan" else model.experts))
    queue.put({"seconds": seconds, "router": router, "warmup": warmup, "gflop": flops / 1e9, "fell_back": fell_back})


def measure(ctx, *args) -> dict:
    queue = ctx.Queue()
    proc = ctx.Process(target=run_one, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", default="neutron", choices=["neutron", "proton"])
    parser.add_argument("--widths", nargs="+", type=float, default=[1.0, 0.125], help="1.0 is the thesis-size network")
    parser.add_argument("--experts", nargs="+", type=int, default=[1, 2, 3, 4, 5], help="ExpertSim rows (0 for none)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--n", type=int, default=2000, help="responses per configuration (short default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    peak = matmul_gflops(args.device)
    print(f"device {args.device}, {args.threads} threads, {args.detector}, batch {args.batch_size}, {args.n} responses "
          f"per row; measured fp32 matmul (2048^2): {peak:.0f} GFLOP/s; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores at start")
    header = (f"{'model':<12} {'width':>5} {'eager s/10k':>11} {'compiled s/10k':>14} {'speed-up':>8} {'compile s':>9} "
              f"{'router %':>8} {'GFLOP/sample':>12} {'GFLOP/s eager':>13} {'GFLOP/s comp.':>13} {'% matmul':>8} {'load':>5}")
    print(header)
    print("-" * len(header))
    ctx = mp.get_context("spawn")
    rows = [("gan", 1)] + [("expertsim", k) for k in args.experts if k > 0]
    for width in args.widths:
        for kind, k in rows:
            common = (kind, args.detector, width, k)
            eager = measure(ctx, *common, False, args.batch_size, args.n, args.device, args.threads)
            comp = measure(ctx, *common, True, args.batch_size, args.n, args.device, args.threads)
            scale = 10_000 / args.n
            rate_e = eager["gflop"] * args.n / eager["seconds"]
            rate_c = comp["gflop"] * args.n / comp["seconds"]
            name = "GAN" if kind == "gan" else f"ExpertSim {k}"
            note = "  (compile unavailable: eager)" if comp["fell_back"] else ""
            router = f"{100 * comp['router'] / comp['seconds']:>7.1f}%" if kind == "expertsim" else f"{'':>8}"
            print(f"{name:<12} {width:>5.3g} {eager['seconds'] * scale:>11.2f} {comp['seconds'] * scale:>14.2f} "
                  f"{eager['seconds'] / comp['seconds']:>7.2f}x {comp['warmup']:>9.1f} {router} {eager['gflop']:>12.3f} "
                  f"{rate_e:>13.1f} {rate_c:>13.1f} {100 * rate_c / peak:>7.0f}% {os.getloadavg()[0]:>5.1f}{note}",
                  flush=True)


if __name__ == "__main__":
    main()
