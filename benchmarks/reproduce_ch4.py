"""Chapter 4 (SDI-GAN): Table 4.4.1, thesis numbers beside rsgm's.

    python benchmarks/reproduce.py --chapter 4                              # 3 seeds, 60 epochs, no HEP column
    python benchmarks/reproduce.py --chapter 4 -- --seeds 0 1 2 --epochs 120 --hep-max-steps 75 --hep-seeds 0 1

The synthetic 2-D columns run ``benchmarks/synthetic2d_table.py`` (DC-GAN, MS-GAN, DivCo and
SDI-GAN: ``configs/sdigan_synthetic2d.yaml`` plus ``configs/synthetic2d/<row>.yaml``). The
HEP column (``--hep-max-steps`` > 0: training batches per run, load-independent; or
``--hep-budget-s`` > 0: training seconds per run, load-dependent) trains the same four models
on the synthetic ZDC with ``configs/sdigan_zdc.yaml`` plus ``configs/baselines/{gan,msgan,divco}.yaml``
through ``benchmarks/expertsim_table.py`` and reports the mean channel W1; ``--hep-only`` skips
the 2-D runs. Further ``--model.* / --data.* / --trainer.*``
arguments go to the 2-D runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_common import mean_std, print_table  # noqa: E402

# Table 4.4.1: var. spread=0, var. spread=1, W spread=0, W spread=1, HEP W.
THESIS_441 = {"dcgan": (0.2, 2.3, 0.7, 7.4, 7.6), "msgan": (115.5, 280.7, 9.0, 6.7, 21.7),
              "divco": (163.3, 3.7, 1.1, 7.0, 14.3), "sdigan": (3.3, 127.4, 1.2, 2.1, 4.5)}
# The ZDC runs of each row (expertsim_table.py row names; the first exists there already).
HEP_ROWS = {"dcgan": "zdc_gan", "msgan": "zdc_msgan", "divco": "zdc_divco", "sdigan": "zdc_sdigan"}
HEP_CONFIGS = {"zdc_msgan": ["sdigan_zdc.yaml", "baselines/msgan.yaml"], "zdc_divco": ["sdigan_zdc.yaml", "baselines/divco.yaml"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--rows", nargs="+", default=list(THESIS_441), choices=list(THESIS_441))
    parser.add_argument("--hep-budget-s", type=int, default=0, help="training seconds per ZDC run (0: skip the HEP column)")
    parser.add_argument("--hep-max-steps", type=int, default=0,
                        help="training batches per ZDC run (takes precedence over --hep-budget-s)")
    parser.add_argument("--hep-seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--hep-only", action="store_true", help="only the HEP column (no 2-D runs)")
    args, rest = parser.parse_known_args(argv)
    if args.hep_only and not (args.hep_max_steps > 0 or args.hep_budget_s > 0):
        parser.error("--hep-only needs --hep-max-steps (or --hep-budget-s)")
    table2d = importlib.import_module("synthetic2d_table")
    results = {} if args.hep_only else table2d.run_table(table2d.parse_args(
        ["--rows", *args.rows, "--seeds", *map(str, args.seeds), "--epochs", str(args.epochs), *rest]))
    hep: dict[str, list[dict]] = {}
    hep_args = None
    if args.hep_max_steps > 0 or args.hep_budget_s > 0:
        from reproduce_ch5 import run_expertsim_table

        table = importlib.import_module("expertsim_table")
        table.ROWS.update(HEP_CONFIGS)
        budget = ["--max-steps", str(args.hep_max_steps)] if args.hep_max_steps > 0 else ["--budget-s", str(args.hep_budget_s)]
        hep_args, hep = run_expertsim_table(["--rows", *[HEP_ROWS[r] for r in args.rows],
                                             "--seeds", *map(str, args.hep_seeds), *budget])
    names = {"dcgan": "DC-GAN", "msgan": "MS-GAN", "divco": "DivCo", "sdigan": "SDI-GAN"}
    hep_note = (f"HEP: synthetic ZDC neutron, {table.budget_text(hep_args)}, seeds {args.hep_seeds}" if hep_args
                else "HEP: not run (--hep-max-steps 0)")
    if args.hep_only:
        lines = [[names[row], THESIS_441[row][4], mean_std([r["w1"] for r in hep[HEP_ROWS[row]]]),
                  " / ".join(f"{q:.1f}" for q in np.mean([r["q"] for r in hep[HEP_ROWS[row]]], 0))] for row in args.rows]
        print_table("Table 4.4.1, HEP column (ZDC)", ["model", "thesis HEP W1", "rsgm HEP W1", "rsgm W1 per quartile Q1-Q4"],
                    lines, note=f"rsgm: {hep_note}")
        return 0
    real = next(iter(results.values()))[0]
    header = ["model", "var. spread=0 (thesis / rsgm)", "var. spread=1", "W1 spread=0", "W1 spread=1", "HEP W1"]
    lines = [["real data", f"1 / {real['real_var_spread0']:.2f}", f"100 / {real['real_var_spread1']:.1f}", "–", "–", "–"]]
    for row, rs in results.items():
        thesis = THESIS_441[row]
        cells = [f"{t} / {mean_std([r[k] for r in rs])}" for t, k in zip(thesis, table2d.COLUMNS)]
        hep_rs = hep.get(HEP_ROWS[row])
        cells.append(f"{thesis[4]} / {mean_std([r['w1'] for r in hep_rs]) if hep_rs else 'not run'}")
        lines.append([names[row], *cells])
    note = f"rsgm: mean ± std over seeds {args.seeds}, {args.epochs} epochs (2-D); {hep_note}"
    print_table("Table 4.4.1: synthetic 2-D benchmark and HEP (ZDC)", header, lines, note=note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
