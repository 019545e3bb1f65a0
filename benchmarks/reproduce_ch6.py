"""Chapter 6 (B4B) on the built-in digits testbed: Table 6.4.1, Tables A.6.1-A.6.4 and A.6.7, the
3-6 sybil rows and the 2^8 / 2^14 bucket ablation, each printed beside the thesis's numbers.

    python benchmarks/reproduce.py --chapter 6 [-- --seeds 0 1 2 --tables 6.4.1 A.6.1 ...]
    python benchmarks/reproduce_ch6.py --seeds 0 1 2 --ablation-seeds 0    # a quicker pass: ablations at seed 0

Every row is ``rsgm test --config configs/b4b_digits.yaml [--config configs/b4b/...]`` with
``--seed_everything S --model.init_args.seed S`` (same victim and corpus; the seed moves the
surrogate's initialisation, the stealing batches and the probes).  A run folder
``runs/reproduce_ch6/<table>/seed<S>/`` that already holds ``b4b_table.csv`` is read, not rerun.
Needs the testbed victim: ``rsgm fit --config configs/b4b_victim_digits.yaml``.  All tables at
3 seeds are 27 protocol runs, about 1 h of one core on a loaded 2-core machine.

The testbed has three tasks (digits, shapes, textures) instead of the thesis's four (CIFAR10,
STL10, SVHN, FashionMNIST), attack budgets of 4000 / 16000 queries instead of 50k / 100k, and a
cost function re-scaled to its coverage range (configs/b4b_digits.yaml); each ablation changes
the same parameter by the same factor as the thesis (configs/b4b/testbed/).  Compare the shape
of each table (who wins, which way a change moves), not the numbers.  Thesis cells are the mean
of its four tasks; rsgm cells the mean of three tasks, mean ± std over seeds.  The SimSiam
ResNet-50 and DINO rows need ImageNet, the four task datasets and a GPU: their configs
(configs/b4b_simsiam_imagenet.yaml, configs/b4b/imagenet/, configs/b4b/dino_vits16.yaml) exist
and fail in one line without them.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_common import mean_std, print_table  # noqa: E402

BASE = "configs/b4b_digits.yaml"
# table -> (overlays on BASE, title)
TABLES = {
    "6.4.1": ([], "Table 6.4.1: B4B vs no defence and static noise"),
    "A.6.1": (["configs/b4b/testbed/a6_1_lam1e-4.yaml"], "Table A.6.1: lambda x100"),
    "A.6.2": (["configs/b4b/testbed/a6_2_beta0.5.yaml"], "Table A.6.2: beta 0.8 -> 0.5 (x0.625)"),
    "A.6.3": (["configs/b4b/testbed/a6_3_beta0.3.yaml"], "Table A.6.3: beta 0.8 -> 0.3 (x0.375)"),
    "A.6.4": (["configs/b4b/testbed/a6_4_alpha0.1_beta0.3.yaml"], "Table A.6.4: alpha x0.1, beta x0.375, 4 sybils"),
    "sybils": (["configs/b4b/testbed/sybils_3_6.yaml"], "Table 6.4.1, sybil rows: 3-6 accounts"),
    "A.6.7": (["configs/b4b/a6_7_transforms.yaml"], "Table A.6.7: transforms alone, legitimate users"),
    "buckets8": (["configs/b4b/buckets_2e8.yaml"], "App. A.6.6: 2^8 buckets"),
    "buckets14": (["configs/b4b/buckets_2e14.yaml"], "App. A.6.6: 2^14 buckets"),
}
SEEDED = ("6.4.1",)  # tables run over --seeds; the others over --ablation-seeds

# Thesis numbers (CIFAR10, STL10, SVHN, F-MNIST), SimSiam unless noted; testbed row -> thesis row.
T641 = {
    ("Legit", "none", "ALL"): ("Legit, none, ALL", (90.41, 95.08, 75.47, 91.22)),
    ("Legit", "noise_0.1", "ALL"): ("Legit, noise 0.1, ALL (A.6.5)", (90.20, 95.15, 75.29, 91.24)),
    ("Legit", "noise_10", "ALL"): ("Legit, noise 10, ALL (A.6.5)", (65.11, 76.37, 33.23, 65.83)),
    ("Legit", "b4b", "ALL"): ("Legit, B4B, ALL", (90.24, 95.05, 74.96, 91.70)),
    ("Attack", "none", "4000"): ("Attack, none, 50K", (65.2, 64.9, 63.1, 88.5)),
    ("Attack", "none", "16000"): ("Attack, none, 100K", (68.1, 63.1, 61.5, 89.0)),
    ("Attack", "noise_0.1", "4000"): ("Attack, noise 0.1, 50K (A.6.5)", (64.92, 64.61, 62.35, 88.41)),
    ("Attack", "noise_10", "4000"): ("Attack, noise 10, 50K (A.6.5)", (36.32, 32.59, 20.59, 74.94)),
    ("Attack", "b4b", "4000"): ("Attack, B4B, 50K", (35.72, 31.54, 19.74, 70.01)),
    ("Attack", "b4b", "16000"): ("Attack, B4B, 100K", (12.01, 13.94, 19.96, 69.63)),
    ("Sybil", "b4b", "2x8000"): ("Sybil, B4B, 2x50K", (39.56, 38.50, 23.41, 77.01)),
}
ABLATION = {  # table -> [legit B4B, attack 50K, attack 100K, sybil row]
    "A.6.1": [(90.02, 94.88, 74.72, 91.76), (28.22, 26.62, 19.62, 78.41), (17.73, 15.59, 19.53, 55.11), (33.43, 31.18, 22.91, 75.35)],
    "A.6.2": [(90.27, 95.12, 74.94, 91.66), (15.52, 12.57, 19.53, 23.17), (16.27, 13.93, 19.54, 54.69), (30.14, 29.57, 19.99, 71.72)],
    "A.6.3": [(88.1, 94.92, 74.37, 91.67), (30.82, 26.37, 21.87, 66.0), (9.57, 9.83, 19.57, 27.06), (29.15, 28.67, 19.98, 70.62)],
    "A.6.4": [(90.17, 94.92, 74.97, 91.71), (19.95, 15.54, 19.57, 23.50), (10.35, 12.37, 19.34, 68.93), (33.15, 30.23, 20.87, 72.19)],
}
SYBILS = {"3x5333": (33.87, 38.57, 21.16, 72.95), "4x4000": (33.98, 34.52, 21.21, 70.71),
          "5x3200": (32.65, 32.45, 29.63, 70.12), "6x2666": (26.62, 26.85, 24.32, 70.51)}
A67 = {"none": (90.41, 95.08, 75.47, 91.22), "affine": (90.24, 95.05, 74.96, 91.42), "pad_shuffle": (90.4, 95.34, 75.47, 91.38),
       "affine_pad_shuffle": (90.18, 95.03, 74.86, 91.35), "binary": (88.78, 94.72, 68.42, 88.91)}
BUCKETS = {8: "ImageNet saturates all buckets after ~50k queries", 12: "ImageNet ~80 % after 100k; tasks < 30 % (50k)",
           14: "never above ~40 %"}


def run_dir(table: str, seed: int, root: Path) -> Path:
    return root / table.replace(".", "_") / f"seed{seed}"


def run(table: str, seed: int, root: Path) -> Path:
    """The run folder of ``table`` at ``seed``; runs ``rsgm test`` unless it already holds a table."""
    out = run_dir(table, seed, root)
    if (out / "b4b_table.csv").is_file():
        return out
    if not (ROOT / "artifacts/b4b_victim_digits/encoder.pt").is_file():
        raise SystemExit("reproduce_ch6: train the testbed victim first: rsgm fit --config configs/b4b_victim_digits.yaml")
    configs = [BASE, *TABLES[table][0]]
    cmd = [sys.executable, "-m", "rsgm.cli", "test"] + [a for c in configs for a in ("--config", c)]
    cmd += ["--seed_everything", str(seed), "--model.init_args.seed", str(seed), "--logger", "csv",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(out)]
    print("$ rsgm " + " ".join(cmd[3:]), flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return out


def table_of(folder: Path) -> pd.DataFrame:
    t = pd.read_csv(folder / "b4b_table.csv", dtype={"queries": str})
    t["tasks_mean"] = t[[c for c in t.columns if c not in ("user", "defense", "queries", "coverage", "mean")]].mean(axis=1)
    return t


def coverage_of(folder: Path) -> dict[str, float]:
    """Final coverage of every account under the ``b4b`` defence (from the logged metrics)."""
    m = pd.read_csv(folder / "metrics.csv")
    return {c.split("/")[2]: float(m[c].dropna().iloc[-1]) for c in m.columns if c.startswith("b4b/b4b/") and c.endswith("/coverage")}


def cell(tables: list[pd.DataFrame], user: str, defense: str, queries: str, col: str = "tasks_mean") -> str:
    vals = []
    for t in tables:
        hit = t[(t.user == user) & (t.defense == defense) & (t.queries == queries)]
        if len(hit):
            vals.append(float(hit[col].iloc[0]))
    return mean_std(vals) if vals else "n/a"


def thesis(v) -> str:
    return f"{np.mean(v):.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of Table 6.4.1")
    ap.add_argument("--ablation-seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the other tables")
    ap.add_argument("--tables", nargs="+", default=list(TABLES), choices=list(TABLES))
    ap.add_argument("--root", default="runs/reproduce_ch6", help="run folders (reused when they hold a table)")
    args = ap.parse_args(argv)
    root = ROOT / args.root
    runs = {t: [run(t, s, root) for s in (args.seeds if t in SEEDED else args.ablation_seeds)] for t in args.tables}
    tabs = {t: [table_of(f) for f in fs] for t, fs in runs.items()}
    seeds = lambda t: ", ".join(str(s) for s in (args.seeds if t in SEEDED else args.ablation_seeds))  # noqa: E731
    head = ["row (testbed)", "thesis row", "thesis mean of 4 tasks", "rsgm digits", "rsgm shapes", "rsgm textures",
            "rsgm mean of 3", "coverage"]

    def row(t, key, label, values):
        user, defense, q = key
        return [f"{user}, {defense}, {q}", label, thesis(values)] + [cell(tabs[t], user, defense, q, c) for c in
                                                                      ("digits", "shapes", "textures", "tasks_mean", "coverage")]

    if "6.4.1" in tabs:
        print_table(TABLES["6.4.1"][1] + f" (seeds {seeds('6.4.1')})", head,
                    [row("6.4.1", k, label, v) for k, (label, v) in T641.items()])
    for t, sybil in (("A.6.1", "2x8000"), ("A.6.2", "2x8000"), ("A.6.3", "2x8000"), ("A.6.4", "4x4000")):
        if t in tabs:
            keys = [("Legit", "b4b", "ALL"), ("Attack", "b4b", "4000"), ("Attack", "b4b", "16000"), ("Sybil", "b4b", sybil)]
            labels = ["Legit, B4B, ALL", "Attack, B4B, 50K", "Attack, B4B, 100K", "Sybil, B4B, " + ("4x25K" if t == "A.6.4" else "2x50K")]
            print_table(TABLES[t][1] + f" (seeds {seeds(t)})", head,
                        [row(t, k, label, v) for k, label, v in zip(keys, labels, ABLATION[t])])
    if "sybils" in tabs:
        print_table(TABLES["sybils"][1] + f" (seeds {seeds('sybils')})", head,
                    [row("sybils", ("Sybil", "b4b", k), f"Sybil, B4B, {k[0]}x{100 // int(k[0])}K", v) for k, v in SYBILS.items()])
    if "A.6.7" in tabs:
        print_table(TABLES["A.6.7"][1] + f" (seeds {seeds('A.6.7')})", head,
                    [row("A.6.7", ("Legit", k, "ALL"), f"{k}, SimSiam", v) for k, v in A67.items()])
    buckets = {8: runs.get("buckets8"), 12: runs.get("6.4.1"), 14: runs.get("buckets14")}
    if any(buckets[b] for b in (8, 14)):
        rows = []
        for bits, folders in buckets.items():
            if not folders:
                continue
            covs = [coverage_of(f) for f in folders]
            users = ("legit-digits", "legit-shapes", "legit-textures", "attack-4000", "attack-16000")
            rows.append([f"2^{bits}", BUCKETS[bits]] + [mean_std([c[u] for c in covs], 3) for u in users])
        print_table("App. A.6.6: coverage (fraction of occupied buckets) under B4B by number of buckets",
                    ["buckets", "thesis (SimSiam, ImageNet)", "legit digits", "legit shapes", "legit textures",
                     "attack 4000", "attack 16000"], rows)
    print("Not run here (need ImageNet, CIFAR10/STL10/SVHN/FashionMNIST folders, the SimSiam or DINO weights and a GPU): "
          "Table 6.4.1 and A.6.1-A.6.7 on SimSiam ResNet-50 (configs/b4b_simsiam_imagenet.yaml + configs/b4b/imagenet/*.yaml), "
          "Table A.6.6 and the DINO rows of A.6.7 (configs/b4b/dino_vits16.yaml), the LAION-5B attack rows (no LAION config).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
