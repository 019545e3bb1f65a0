"""One-shot GPU benchmark of every pillar: 1 GPU against 1 CPU process, same code, same sizes.

    bash benchmarks/gpu.sh                      # on a machine with a CUDA GPU (about 5 minutes on an H200)
    python benchmarks/gpu_bench.py --small      # CPU only, tiny sizes (what the test suite runs)

Sections (each catches its own failure and records it, so one broken section loses nothing else):

* ``zdc``: ZDC generation, samples/s, eager vs ``torch.compile``, thesis-size (width 1.0)
  and compact (width 0.125) neutron generators at several batch sizes;
* ``cdi``: CDI feature extraction, seconds per 64 samples per feature, on a tiny DiT
  (latent diffusion transformer, random weights) and on the built-in digits DDPM
  (``models/dm_digits`` if trained, else a tiny one trained here for a few steps);
* ``di``: the batched dataset-inference statistics (``rsgm.privacy.stats.batched_cdi``,
  a torch path: logistic regressions solved on the device), seconds for 1000 trials;
* ``b4b``: B4B defence overhead: bare encoder batch vs encoder + defence on the same batch.

Writes ``gpu_bench.json`` and ``gpu_bench.md`` (``--small``: ``gpu_bench_small.*``) under
``--out``: one row per measurement, with the CPU value, the GPU value and the ratio.
The CPU column is one process with ``--cpu-threads`` threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def per_call(fn: Callable[[], object], device: str, budget_s: float, min_reps: int = 2, max_reps: int = 50,
             warmup: bool = True) -> float:
    """Median seconds of one call of ``fn`` (after one warm-up call), repeating until
    ``budget_s`` seconds have passed or ``max_reps`` calls are done."""
    if warmup:
        fn()
        sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# -- sections -------------------------------------------------------------------------------
def bench_zdc(device: str, small: bool, budget: float) -> list[dict]:
    from rsgm.components.gan import ZDCGenerator

    rows = []
    # Thesis-size activations take about 3 MB per sample: 16384 is the largest batch that fits comfortably.
    batches = {0.125: [64]} if small else {1.0: [1024, 4096, 16384], 0.125: [1024, 8192, 65536]}
    cpu_max = {1.0: 4096, 0.125: 8192}  # larger batches only take longer per call on a CPU, at the same rate
    # --small: the aot_eager backend traces the graph without building C++ (quick on a CPU);
    # the full run compiles with inductor on the GPU and leaves the CPU column eager.
    backend = "aot_eager" if small else "inductor"
    for width, sizes in batches.items():
        gen = ZDCGenerator("neutron", width=width).to(device).eval()
        compiled = torch.compile(gen, backend=backend)
        modes = [("eager", gen)] + ([(f"compiled ({backend})", compiled)] if small or device != "cpu" else [])
        for batch in sizes:
            if device == "cpu" and not small and batch > cpu_max[width]:
                continue
            z = torch.randn(batch, gen.noise_dim, device=device)
            c = torch.randn(batch, gen.cond_dim, device=device)
            for mode, net in modes:
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    net(z, c)  # warm-up: for the compiled net this is the compilation
                    sync(device)
                    warm = time.perf_counter() - t0
                    s = per_call(lambda: net(z, c), device, budget)
                rows.append({"section": "zdc", "case": f"width {width:g}, batch {batch}, {mode}",
                             "metric": "samples/s", "value": batch / s, "first_call_s": warm})
    return rows


def tiny_dit_target(folder: Path, layers: int):
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

    from rsgm.components.diffusion_adapters import DiTTarget

    torch.manual_seed(0)
    DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=layers,
                          sample_size=8, patch_size=2, num_embeds_ada_norm=10).save_pretrained(folder / "transformer")
    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                  sample_size=16).save_pretrained(folder / "vae")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    return DiTTarget(str(folder)).load()


def digits_target(path: str, device: str, steps: int, small: bool):
    """The trained built-in target if ``path`` holds one, else a tiny DDPM trained here."""
    from rsgm.components.diffusion_adapters import PixelUNetTarget

    if Path(path, "unet").is_dir():
        return PixelUNetTarget(path=path).load(), f"trained ({path})"
    from rsgm.datamodules.membership import digits_images
    from rsgm.lightning_modules.diffusion import ClassConditionalDiffusion

    torch.manual_seed(0)
    model = ClassConditionalDiffusion(block_out_channels=(8, 16) if small else (32, 64)).to(device)
    x, y = digits_images()
    x, y = x[:300].to(device), y[:300].to(device)
    opt = torch.optim.AdamW(model.unet.parameters(), lr=1e-3)
    for step in range(steps):
        i = torch.randint(0, len(x), (64,), device=device)
        t = torch.randint(0, 1000, (64,), device=device)
        eps = torch.randn_like(x[i])
        ab = model.alphas_cumprod[t].view(-1, 1, 1, 1)
        loss = (model.unet(ab.sqrt() * x[i] + (1 - ab).sqrt() * eps, t, class_labels=y[i]).sample - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return PixelUNetTarget(unet=model.unet, alphas_cumprod=model.alphas_cumprod), f"trained here ({steps} steps)"


def bench_cdi(device: str, small: bool, budget: float, digits_path: str) -> list[dict]:
    from rsgm.datamodules.membership import digits_images
    from rsgm.privacy.diffusion_features import ACCESS, DiffusionFeatureExtractor, FeatureConfig

    rows = []
    # --small: one cheap feature on 8 samples (scaled to 64), 1-layer DiT, a barely trained tiny DDPM.
    features, n, layers = (["pia"], 8, 1) if small else (list(ACCESS), 64, 4)
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        dit = tiny_dit_target(Path(tmp), layers).to(device)
        xs = (torch.rand(n, 3, 16, 16, generator=g) * 2 - 1).to(device)
        cls = torch.randint(0, 10, (n,), generator=g).to(device)
        targets = [(f"tiny DiT ({layers} layers, 16x16 RGB)", dit, xs, cls)]
    digits, what = digits_target(digits_path, device, 5 if small else 300, small)
    x, y = digits_images()
    targets.append((f"digits DDPM, {what}", digits.to(device), x[:n].to(device), y[:n].to(device)))
    for name, target, xb, yb in targets:
        index = torch.arange(len(xb))
        for feature in features:
            ext = DiffusionFeatureExtractor(FeatureConfig(features=[feature], max_batch=4096))
            s = per_call(lambda: ext(target, xb, yb, index), device, budget, max_reps=5)
            rows.append({"section": "cdi", "case": f"{name}, {feature}", "metric": "s / 64 samples", "value": s * 64 / n})
    return rows


def bench_di(device: str, small: bool, budget: float) -> list[dict]:
    from rsgm.privacy import stats as S

    rows = []
    trials = 50 if small else 1000
    g = torch.Generator().manual_seed(0)
    members, nonmembers = torch.randn(2000, 26, generator=g) + 0.05, torch.randn(2000, 26, generator=g)
    S.batched_cdi(members, nonmembers, S.draw_trials(2000, 2000, 50, 50, 2, seed=0), device=device)  # warm-up
    for n in ([50] if small else [50, 300] if device == "cpu" else [50, 300, 1000]):
        draw = S.draw_trials(2000, 2000, n, n, trials, seed=n)
        s = per_call(lambda: S.batched_cdi(members, nonmembers, draw, device=device), device, budget, min_reps=1,
                     max_reps=3, warmup=False)
        rows.append({"section": "di", "case": f"|P| = |U| = {n}, {trials} trials, 26 features (torch path)",
                     "metric": "s", "value": s})
    return rows


def bench_b4b(device: str, small: bool, budget: float) -> list[dict]:
    from rsgm.components.encoders import ResNet50, SmallConvEncoder
    from rsgm.defenses.b4b import B4BDefense

    cases = [("testbed CNN 1x16x16", SmallConvEncoder(width=32, rep_dim=64), (64 if small else 256, 1, 16, 16))]
    if not small:
        cases.append(("ResNet-50 3x224x224", ResNet50(), (64, 3, 224, 224)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, enc, shape) in enumerate(cases):
            enc = enc.to(device).eval()
            x = torch.randn(*shape, device=device)
            defense = B4BDefense(enc(x[:2]).shape[1], Path(tmp) / f"s{i}.sqlite", b"benchmark-secret-0123456789",
                                 transform="affine")
            with torch.inference_mode():
                bare = per_call(lambda: enc(x), device, budget)
                # The defence keeps its coverage store on the host: representations cross to the CPU.
                defended = per_call(lambda: defense.respond("steady", enc(x).cpu()), device, budget)
            rows.append({"section": "b4b", "case": f"{name}, batch {shape[0]}, bare encoder", "metric": "ms / batch", "value": bare * 1e3})
            rows.append({"section": "b4b", "case": f"{name}, batch {shape[0]}, encoder + defence", "metric": "ms / batch",
                         "value": defended * 1e3, "overhead_pct": 100 * (defended - bare) / bare})
    return rows


SECTIONS = {"zdc": bench_zdc, "cdi": bench_cdi, "di": bench_di, "b4b": bench_b4b}


def run_sections(device: str, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    rows, failures = [], []
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            extra = {"digits_path": args.digits} if name == "cdi" else {}
            got = SECTIONS[name](device, args.small, args.budget, **extra)
            rows += [r | {"device": device} for r in got]
            print(f"[{device}] {name}: {len(got)} rows in {time.perf_counter() - t0:.0f} s", flush=True)
        except Exception as err:  # a broken section is recorded, the others still run
            failures.append({"section": name, "device": device, "error": f"{type(err).__name__}: {err}",
                             "traceback": traceback.format_exc(limit=4)})
            print(f"[{device}] {name}: FAILED ({type(err).__name__}: {err})", flush=True)
    return rows, failures


def table(rows: list[dict], devices: list[str]) -> list[dict]:
    """One line per (section, case): the value on each device and GPU / CPU speed ratio."""
    merged: dict[tuple[str, str], dict] = {}
    for r in rows:
        line = merged.setdefault((r["section"], r["case"]), {"section": r["section"], "case": r["case"], "metric": r["metric"]})
        line[r["device"]] = r["value"]
        for key in ("first_call_s", "overhead_pct"):
            if key in r:
                line[f"{key} ({r['device']})"] = r[key]
    for line in merged.values():
        if "cpu" in line and "cuda" in line:
            faster_is_higher = line["metric"].endswith("/s")
            line["gpu_speedup"] = line["cuda"] / line["cpu"] if faster_is_higher else line["cpu"] / line["cuda"]
    return list(merged.values())


def markdown(lines: list[dict], failures: list[dict], meta: dict) -> str:
    out = [f"# rsgm GPU benchmark ({'--small, ' if meta['small'] else ''}{meta['gpu'] or 'no GPU'})", "",
           f"CPU column: one process, {meta['cpu_threads']} threads ({meta['cpu']}); torch {meta['torch']}; "
           f"total {meta['total_s']:.0f} s.", "",
           "| section | case | metric | 1 CPU | 1 GPU | GPU speed-up | notes |", "|---|---|---|---:|---:|---:|---|"]
    fmt = lambda v: "" if v is None else (f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4g}")  # noqa: E731
    for line in lines:
        notes = ", ".join(f"{k} {v:.3g}" for k, v in line.items() if k.startswith(("first_call_s", "overhead_pct")))
        speed = f"{line['gpu_speedup']:.1f}x" if "gpu_speedup" in line else ""
        out.append(f"| {line['section']} | {line['case']} | {line['metric']} | {fmt(line.get('cpu'))} | "
                   f"{fmt(line.get('cuda'))} | {speed} | {notes} |")
    if failures:
        out += ["", "## Failed sections", ""] + [f"- {f['section']} on {f['device']}: {f['error']}" for f in failures]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny sizes, runs in about a minute on a CPU")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    ap.add_argument("--budget", type=float, default=None, help="seconds of repeats per measurement (default 2, --small 0.2)")
    ap.add_argument("--cpu-threads", type=int, default=None, help="default: all cores (--small: 1)")
    ap.add_argument("--digits", default="models/dm_digits", help="trained built-in target (rsgm fit --config configs/dm_digits.yaml)")
    args = ap.parse_args(argv)
    args.budget = args.budget if args.budget is not None else (0.2 if args.small else 2.0)
    torch.set_num_threads(args.cpu_threads or (1 if args.small else torch.get_num_threads()))
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    start = time.perf_counter()
    rows, failures = [], []
    # GPU first: the CPU column is the slow one and the GPU results matter most if time runs out.
    for device in sorted(devices, key=lambda d: d == "cpu"):
        r, f = run_sections(device, args)
        rows, failures = rows + r, failures + f
    meta = {"small": args.small, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(), "total_s": time.perf_counter() - start,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    lines = table(rows, devices)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_bench_small" if args.small else "gpu_bench"
    result = {"meta": meta, "table": lines, "rows": rows, "failures": failures}
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(markdown(lines, failures, meta))
    print(markdown(lines, failures, meta))
    return result


if __name__ == "__main__":
    main()
