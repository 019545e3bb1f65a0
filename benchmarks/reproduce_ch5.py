"""Chapter 5 (ExpertSim): Table 5.4.2 on the synthetic ZDC, thesis numbers beside rsgm's,
with the Monte-Carlo row (two independent simulator runs compared with each other).

    python benchmarks/reproduce.py --chapter 5                                  # defaults below
    python benchmarks/reproduce.py --chapter 5 -- --max-steps 75 --seeds 0 1 --mc-seeds 0 1 2 3 4
    python benchmarks/reproduce_ch5.py --mc-only                                # the Monte-Carlo row alone

The model rows are ``benchmarks/expertsim_table.py`` (same rows, same training budget per
run, its own arguments: ``--max-steps`` (training batches, load-independent), ``--budget-s``
(seconds, load-dependent), ``--seeds``, ``--n-synthetic``, ``--rows``, ... pass through). The Monte-Carlo row re-simulates the test split's conditions with the built-in
simulator under independent seeds and compares them with the test responses by the same
channel W1 (``rsgm.metrics.monte_carlo.monte_carlo_w1``): the best W1 any model can reach
on that data. Rows ``expertsim_pixel_distance`` and ``expertsim_aux_pixels`` are the
chapter-5 readings of d_I and of eq. 5.4's units (docs/expertsim.md).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from unittest import mock

import numpy as np

from rsgm.datamodules.zdc import ZDCDataModule
from rsgm.metrics.monte_carlo import monte_carlo_w1
from rsgm.physics.units import model_space_to_counts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_common import mean_std, print_table  # noqa: E402

# Table 5.4.2 (neutron column: the built-in simulator is the neutron calorimeter), mean and std over 5 runs.
THESIS_542 = {"zdc_gan": ("GAN", 2.42, 0.041), "zdc_sdigan": ("SDI-GAN", 2.31, 0.063),
              "zdc_sdigan_ir": ("SDI-GAN + IR", 2.04, 0.018), "zdc_sdigan_ir_ar": ("SDI-GAN + IR + AR", 1.89, 0.029),
              "expertsim": ("ExpertSim", 1.34, 0.010)}
THESIS_MC = (0.34, 0.014)
# Tables 5.5.2 (number of experts) and 5.5.3 (router weights), neutron column; one number each, no std.
THESIS_55 = {"expertsim_n2": ("ExpertSim, 2 experts", 1.76), "expertsim_n4": ("ExpertSim, 4 experts", 1.63),
             "expertsim_n5": ("ExpertSim, 5 experts", 3.12), "expertsim_util0.1": ("ExpertSim, λ_util 0.1", 4.14),
             "expertsim_util0.001_diff1e-5": ("ExpertSim, λ_util 0.001, λ_diff 1e-5", 2.52),
             "expertsim_diff1e-3": ("ExpertSim, λ_diff 1e-3", 1.91), "expertsim_diff1e-6": ("ExpertSim, λ_diff 1e-6", 1.74),
             "expertsim_no_ldiff": ("ExpertSim, L_diff off", 8.01), "expertsim_no_lutil": ("ExpertSim, L_util off", 1.89)}
DEFAULT_ROWS = [*THESIS_542, "expertsim_pixel_distance", "expertsim_aux_pixels"]


def run_expertsim_table(argv: list[str]) -> tuple[argparse.Namespace, dict[str, list[dict]]]:
    """Run ``benchmarks/expertsim_table.py`` with ``argv`` (its own command line) and return
    its parsed arguments and per-row, per-seed results (its table is printed as well)."""
    table = importlib.import_module("expertsim_table")
    captured: dict = {}
    run_all = table.run_all

    def keep(args, root):
        captured["args"], captured["results"] = args, run_all(args, root)
        return captured["results"]

    with mock.patch.object(table, "run_all", keep), mock.patch.object(sys, "argv", ["expertsim_table.py", *argv]):
        table.main()
    return captured["args"], captured["results"]


def monte_carlo_row(n_synthetic: int, data_seed: int, mc_seeds: list[int], detector: str = "neutron") -> list[dict]:
    """The Monte-Carlo row on the test split that ``ZDCDataModule(n_synthetic, seed=data_seed)``
    evaluates the models on: one re-simulation per seed in ``mc_seeds``."""
    dm = ZDCDataModule(path=None, detector=detector, n_synthetic=n_synthetic, seed=data_seed)
    dm.setup("test")
    raw_cond, _ = dm._test_raw
    images = model_space_to_counts(dm.test_set.tensors["x"].squeeze(1))
    return [monte_carlo_w1(images, raw_cond, detector, seed=1000 + s) for s in mc_seeds]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mc-seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="independent re-simulations")
    parser.add_argument("--mc-only", action="store_true", help="only the Monte-Carlo row (no training)")
    parser.add_argument("--n-synthetic", type=int, default=6000, help="synthetic samples (as expertsim_table.py)")
    args, rest = parser.parse_known_args(argv)
    results: dict[str, list[dict]] = {}
    title = f"Table 5.4.2: channel W1 (neutron), synthetic ZDC, {args.n_synthetic} samples"
    if not args.mc_only:
        rows = [] if "--rows" in rest else ["--rows", *DEFAULT_ROWS]
        table = importlib.import_module("expertsim_table")
        table_args, results = run_expertsim_table([*rows, "--n-synthetic", str(args.n_synthetic), *rest])
        if any(row in THESIS_55 for row in table_args.rows):
            title = title.replace("Table 5.4.2", "Tables 5.4.2, 5.5.2 and 5.5.3")
        title += f", {table.budget_text(table_args)}, seeds {table_args.seeds}"
    mc = monte_carlo_row(args.n_synthetic, 0, args.mc_seeds)
    lines = []
    for row, rs in results.items():
        name, mean, std = THESIS_542.get(row) or (*THESIS_55.get(row, (row, None)), None)
        thesis = (f"{mean:.2f} ± {std:.3f}" if std is not None else f"{mean:.2f}" if mean is not None
                  else "(not in the thesis: docs/expertsim.md)")
        lines.append([name, thesis, mean_std([r["w1"] for r in rs]),
                      " / ".join(f"{q:.1f}" for q in np.nanmean([r["q"] for r in rs], 0))])
    lines.append(["Monte-Carlo (two simulator runs)", f"{THESIS_MC[0]:.2f} ± {THESIS_MC[1]:.3f}",
                  mean_std([m["w1_mean"] for m in mc]),
                  " / ".join(f"{q:.1f}" for q in np.nanmean([m["w1_quartiles"] for m in mc], 0))])
    print_table(title, ["model", "thesis W1 (neutron)", "rsgm W1", "rsgm W1 per quartile Q1-Q4"], lines,
                note=f"rsgm: mean ± std over seeds; Monte-Carlo over re-simulation seeds {args.mc_seeds}. "
                     "The thesis's data are GEANT4 showers, rsgm's the built-in simulator: compare the order of rows.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
