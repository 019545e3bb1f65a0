"""Eager against optimised (compiled, fused) generation of ZDC responses, in one run.

For each generator width (1.0 = thesis size, 0.125 = compact) it times the generation path
that ``rsgm predict`` and the evaluation use (``simulate``: noise, routing, generator(s),
photon counts, in ``torch.inference_mode``) for a single conditional GAN and for ExpertSim
with 1-5 experts. Each configuration runs in a fresh process holding one model, which
generates every batch twice, alternately: eager (the module as trained) and optimised
(``compile_generator=True``: ``torch.compile`` of the generator's fused inference form,
``rsgm.components.zdc_inference``; ``--no-fused`` compiles the module as is;
``--inference-dtype bfloat16`` runs the fused form in bfloat16, opt-in and not exact). Interleaving
puts both paths under the same machine load, so their ratio holds on a shared machine.

Printed per row: seconds per 10,000 responses eager and optimised, the speed-up, the
largest difference between the two paths' photon counts (relative to the largest count),
the compilation time (first call, excluded from the timing), the router's share of the
optimised time (ExpertSim), the generator's FLOPs per sample as trained and as fused, the
achieved GFLOP/s of each path (its own FLOPs over its time) against this machine's fp32
matmul throughput measured at the start, and the load average (the machine may be shared).

    python benchmarks/zdc_generation.py                        # short CPU default (--n 2048)
    python benchmarks/zdc_generation.py --n 10240 --threads 2 --experts 1 2 3 4 5
    python benchmarks/zdc_generation.py --device cuda --n 102400 --batch-size 8192

Weights are untrained (the cost does not depend on them); BatchNorm statistics are
randomised and the last bias lifted off the clip at 0, so the paths' agreement is checked
on non-trivial outputs.
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


def flops_per_sample(module: torch.nn.Module, device: str) -> float:
    z, c = torch.randn(8, module.noise_dim, device=device), torch.randn(8, module.cond_dim, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(z, c)
    return counter.get_total_flops() / 8


def build(kind: str, detector: str, width: float, n_experts: int, fused: bool, dtype: str, device: str):
    from rsgm.lightning_modules.expertsim import ExpertSim
    from rsgm.lightning_modules.sdi_gan import ConditionalGAN

    parts = (ZDCGenerator(detector, width=width, fused_inference=fused, inference_dtype=dtype), ZDCDiscriminator(detector),
             PeakRegressor(detector))
    if kind == "gan":
        model = ConditionalGAN(*parts, compile_generator=True)
    else:
        model = ExpertSim(*parts, n_experts=n_experts, compile_generator=True)
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    for gan in gans(model):  # lift the untrained output off the clip at 0 photons, so the paths are compared
        torch.nn.init.constant_(gan.generator.convs[-2].bias, 2.0)
    return model.to(device).eval()


def gans(model) -> list:
    return [model] if not hasattr(model, "experts") else list(model.experts)


def set_optimised(model, on: bool) -> None:
    for gan in gans(model):
        gan.hparams.compile_generator = on


def run_one(kind: str, detector: str, width: float, n_experts: int, fused: bool, dtype: str, batch: int, n: int,
            device: str, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build(kind, detector, width, n_experts, fused, dtype, device)
    generator = gans(model)[0].generator
    flops = flops_per_sample(generator, device)
    flops_opt = flops_per_sample(generator.inference_form(), device)
    cond = torch.randn(n, generator.cond_dim, device=device)
    times = {False: 0.0, True: 0.0}
    with torch.inference_mode():
        start = time.perf_counter()  # warm-up: compiles (every expert, and a short last batch)
        model.simulate(cond[:batch], torch.Generator().manual_seed(0))
        model.simulate(cond[:max(2, batch // 3)], torch.Generator().manual_seed(0))
        sync(device)
        warmup = time.perf_counter() - start
        diff = 0.0
        for i in range(0, n, batch):
            out = {}
            for on in (False, True):
                set_optimised(model, on)
                start = time.perf_counter()
                out[on], _ = model.simulate(cond[i:i + batch], torch.Generator().manual_seed(i))
                sync(device)
                times[on] += time.perf_counter() - start
            diff = max(diff, ((out[True] - out[False]).abs().max() / out[False].abs().max().clamp_min(1.0)).item())
        router = 0.0
        if kind == "expertsim":
            start = time.perf_counter()
            for i in range(0, n, batch):
                model.route(cond[i:i + batch], torch.Generator().manual_seed(i))
            sync(device)
            router = time.perf_counter() - start
    fell_back = any(g._compiled is not None and g._compiled.failed for g in gans(model))
    queue.put({"eager": times[False], "opt": times[True], "router": router, "warmup": warmup, "diff": diff,
               "gflop": flops / 1e9, "gflop_opt": flops_opt / 1e9, "fell_back": fell_back, "load": os.getloadavg()[0]})


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
    parser.add_argument("--no-gan", action="store_true", help="skip the single-GAN row")
    parser.add_argument("--no-fused", action="store_true", help="compile the generator as trained, not its fused form")
    parser.add_argument("--inference-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the fused form (bfloat16: opt-in, not exact)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--n", type=int, default=2048, help="responses per configuration (short default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    peak = matmul_gflops(args.device)
    print(f"device {args.device}, {args.threads} threads, {args.detector}, batch {args.batch_size}, {args.n} responses "
          f"per row, optimised = torch.compile of the {'module as trained' if args.no_fused else 'fused form'} "
          f"({args.inference_dtype}); "
          f"measured fp32 matmul (2048^2): {peak:.0f} GFLOP/s; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores at start")
    header = (f"| {'model':<11} | {'width':>5} | {'eager s/10k':>11} | {'optimised s/10k':>15} | {'speed-up':>8} | "
              f"{'max rel diff':>12} | {'compile s':>9} | {'router %':>8} | {'GFLOP/sample eager, opt.':>24} | "
              f"{'GFLOP/s eager, opt.':>19} | {'% matmul opt.':>13} | {'load':>5} |")
    print(header)
    print("|" + "|".join("-" * (len(c) + 2) for c in header.split("|")[1:-1]) + "|")
    ctx = mp.get_context("spawn")
    rows = ([] if args.no_gan else [("gan", 1)]) + [("expertsim", k) for k in args.experts if k > 0]
    for width in args.widths:
        for kind, k in rows:
            r = measure(ctx, kind, args.detector, width, k, not args.no_fused, args.inference_dtype, args.batch_size,
                        args.n, args.device, args.threads)
            scale = 10_000 / args.n
            rate_e, rate_o = r["gflop"] * args.n / r["eager"], r["gflop_opt"] * args.n / r["opt"]
            name = "GAN" if kind == "gan" else f"ExpertSim {k}"
            note = " (compile unavailable: fused eager)" if r["fell_back"] else ""
            router = f"{100 * r['router'] / r['opt']:>7.1f}%" if kind == "expertsim" else f"{'':>8}"
            flops = f"{r['gflop']:.3f}, {r['gflop_opt']:.3f}"
            rates = f"{rate_e:.1f}, {rate_o:.1f}"
            print(f"| {name:<11} | {width:>5.3g} | {r['eager'] * scale:>11.2f} | {r['opt'] * scale:>15.2f} | "
                  f"{r['eager'] / r['opt']:>7.2f}x | {r['diff']:>12.1e} | {r['warmup']:>9.1f} | {router} | {flops:>24} | "
                  f"{rates:>19} | {100 * rate_o / peak:>12.0f}% | {r['load']:>5.1f} |{note}", flush=True)


if __name__ == "__main__":
    main()
