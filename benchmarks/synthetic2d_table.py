"""Thesis Table 4.4.1 on the synthetic 2-D benchmark: DC-GAN, MS-GAN, DivCo and SDI-GAN over seeds.

Every row is ``configs/sdigan_synthetic2d.yaml`` (plus the overlay ``configs/synthetic2d/<row>.yaml``) run through the ``rsgm`` command: ``fit``
for ``--epochs`` epochs, then ``test`` of the last checkpoint on the test split. The three
rows share the data (same data seed and split), architecture, learning rates and training
length; they differ only in the diversity regulariser (and its weight: DivCo's contrastive
loss runs at weight 1, ``configs/synthetic2d/divco.yaml``). Only the model seed changes between
repetitions. The table gives the mean generated variance per spread value (real: 1 and
100) and the W1 between real and generated points per spread value, as mean ± std over
seeds (definitions in ``rsgm/metrics/synthetic2d.py``).

    python benchmarks/synthetic2d_table.py                      # 3 seeds, the configs' setting
    python benchmarks/synthetic2d_table.py --seeds 0 1 2 3 4 --epochs 120

Any further ``--section.key value`` arguments go last to every ``rsgm`` call, e.g.
``--model.generator.init_args.noise_gain false`` (the same for all rows).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rsgm.cli import main as rsgm

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ROWS = {"dcgan": "DC-GAN", "msgan": "MS-GAN", "divco": "DivCo", "sdigan": "SDI-GAN"}
# Row -> the base config and the overlay (configs/synthetic2d/) that sets its diversity term.
CONFIG_FILES = {"dcgan": ["sdigan_synthetic2d.yaml", "synthetic2d/dcgan.yaml"],
                "msgan": ["sdigan_synthetic2d.yaml", "synthetic2d/msgan.yaml"],
                "divco": ["sdigan_synthetic2d.yaml", "synthetic2d/divco.yaml"], "sdigan": ["sdigan_synthetic2d.yaml"]}
COLUMNS = ("var_spread0", "var_spread1", "w1_spread0", "w1_spread1")


def run_row(row: str, seed: int, args: argparse.Namespace, root: Path) -> dict[str, float]:
    common = [*[a for f in CONFIG_FILES[row] for a in ("--config", str(CONFIGS / f))], "--logger", "csv", "--run_dir", str(root),
              "--run_name", f"{row}-s{seed}", "--seed_everything", str(seed), "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false"]
    os.environ.pop("RSGM_RUN_DIR", None)
    start = time.perf_counter()
    rsgm(["fit", *common, "--trainer.max_epochs", str(args.epochs), "--trainer.limit_val_batches", "0", *args.rsgm_args])
    seconds = time.perf_counter() - start
    ckpt = max((root / f"{row}-s{seed}").glob("fit-*")) / "checkpoints" / "last.ckpt"
    os.environ.pop("RSGM_RUN_DIR", None)
    rsgm(["test", *common, "--ckpt_path", str(ckpt), *args.rsgm_args])
    result = json.loads((max((root / f"{row}-s{seed}").glob("test-*")) / "test_synthetic2d.json").read_text())
    return {**result, "fit_s": seconds}


def fmt(values: list[float]) -> str:
    a = np.asarray(values, dtype=float)
    digits = 1 if abs(a.mean()) >= 10 else 2
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.{digits}f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=60, help="training epochs of every run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    args, args.rsgm_args = parser.parse_known_args(argv)
    if any(a.startswith("--") and not a.startswith(("--model.", "--data.", "--trainer.")) for a in args.rsgm_args):
        parser.error(f"unknown arguments {args.rsgm_args}; only --model.*, --data.* and --trainer.* pass through to rsgm")
    return args


def run_table(args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    """Fit and test every row for every seed; returns per row the list of per-seed results
    (the keys of ``test_synthetic2d.json`` plus ``fit_s``)."""
    torch.set_num_threads(args.threads)
    # Without --out the runs go to a temporary folder removed at the end.
    with tempfile.TemporaryDirectory(prefix="synthetic2d_table_") as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        results: dict[str, list[dict[str, float]]] = {}
        for row in args.rows:
            for seed in args.seeds:
                r = run_row(row, seed, args, root)
                results.setdefault(row, []).append(r)
                print(f"[{row} seed {seed}] " + ", ".join(f"{k} {r[k]:.2f}" for k in COLUMNS) + f", fit {r['fit_s']:.0f} s",
                      flush=True)
        if args.out:
            print(f"runs kept in {root}")
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = run_table(args)

    real = next(iter(results.values()))[0]
    print(f"\nsynthetic 2-D benchmark, {args.epochs} epochs, seeds {args.seeds}"
          + (f", overrides {' '.join(args.rsgm_args)}" if args.rsgm_args else ""))
    header = "| model | var. spread=0 | var. spread=1 | W1 spread=0 | W1 spread=1 |"
    print(header)
    print("|---|---|---|---|---|")
    print(f"| real data | {real['real_var_spread0']:.2f} | {real['real_var_spread1']:.1f} | – | – |")
    for row, rs in results.items():
        print(f"| {ROWS[row]} | " + " | ".join(fmt([r[k] for r in rs]) for k in COLUMNS) + " |")


if __name__ == "__main__":
    main()
