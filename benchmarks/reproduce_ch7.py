"""Chapter 7 (LAION-mi): the fine-tuning pitfall of Table 7.7.1 on the built-in digits.

Table 7.7.1 compares the same attacks on SD-v1.4's pre-training data (LAION-mi: at most
2.5 % TPR@1 %FPR) and on a model fine-tuned on a few hundred images (POKEMON: up to 99.5 %).
Offline, rsgm builds the two situations from the digits (docs/laionmi.md):

* ``large``: the built-in DDPM trained on the 898-digit member half (SD-v1.4's situation),
* ``finetuned``: that model fine-tuned on 200 further digits for 1,000 steps (POKEMON's),

and runs the Table 7.7.1 attacks on both with ``configs/laionmi_pitfall_digits.yaml``. The
SD-v1.4 rows themselves need the LAION-mi tables, the fetched images and the SD-v1.4 weights
(``configs/laionmi_sd14.yaml``); without them that config stops with the one line printed
in the last table.

    python benchmarks/reproduce.py --chapter 7                 # train both targets if missing, attack, print
    python benchmarks/reproduce.py --chapter 7 -- --retrain    # train both again
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

from reproduce_common import print_table

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models" / "laionmi_pitfall"
# (method, signal in rsgm, label, thesis LAION-mi, thesis POKEMON): Table 7.7.1, TPR@1 %FPR (%).
# In pixel space the latent error is the pixel error, and the grey-box generation attack is the
# black-box one, so those thesis rows map onto rsgm's one pixel-error column.
THESIS = [
    ("baseline_loss", "model_loss", "baseline loss threshold (model loss)", "1.92 ± 0.59", "80.9 ± 2.27"),
    ("reversed_noising", "model_loss", "reversed noising (model loss)", "2.51 ± 0.73", "97.3 ± 0.93"),
    ("partial_denoising", "model_loss", "partial denoising (model loss)", "2.31 ± 0.61", "94.5 ± 1.34"),
    ("reversed_denoising", "model_loss", "reversed denoising (model loss)", "2.25 ± 0.64", "91.5 ± 1.63"),
    ("reversed_noising", "pixel_error", "reversed noising (latent error / pixel error)", "1.26 ± 0.62 / 1.90 ± 0.51", "11.5 ± 1.84 / 8.36 ± 1.66"),
    ("partial_denoising", "pixel_error", "partial denoising (latent error / pixel error)", "2.42 ± 0.62 / 1.75 ± 0.68", "99.5 ± 0.4 / 25.38 ± 2.55"),
    ("reversed_denoising", "pixel_error", "reversed denoising (latent error / pixel error)", "2.17 ± 0.64 / 2.03 ± 0.55", "61.1 ± 2.74 / 12.0 ± 1.97"),
    ("generation_black_box", "pixel_error", "generation from prompt (grey-box latent / black-box pixel)", "0.93 ± 0.41 / 0.35 ± 0.19", "7.15 ± 1.5 / 12.0 ± 1.9"),
]


def rsgm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "rsgm.cli", *args]
    print("$ rsgm " + " ".join(args), flush=True)
    done = subprocess.run(command, cwd=ROOT, text=True, capture_output=not check)
    if check and done.returncode != 0:
        raise SystemExit(f"reproduce ch7: `rsgm {' '.join(args)}` failed with exit status {done.returncode}")
    return done


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def pct(row: dict | None, key: str) -> str:
    if row is None:
        return "n/a"
    return f"{100 * float(row[key + '_mean']):.2f} ± {100 * float(row[key + '_std']):.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chapter 7: the LAION-mi fine-tuning pitfall on the digits")
    parser.add_argument("--retrain", action="store_true", help="train both targets even if models/laionmi_pitfall/ has them")
    parser.add_argument("--run-dir", default="runs/reproduce_ch7", help="where the rsgm runs go")
    args = parser.parse_args(argv)
    common = ["--logger", "csv", "--run_dir", args.run_dir, "--trainer.enable_progress_bar", "false"]
    start = time.perf_counter()
    if args.retrain or not (MODELS / "large" / "membership.json").is_file():
        rsgm("fit", "--config", "configs/dm_digits.yaml", "--config", "configs/laionmi_pitfall_large.yaml", *common, "--run_name", "large", "--overwrite", "true")
    if args.retrain or not (MODELS / "finetuned" / "membership.json").is_file():
        rsgm("fit", "--config", "configs/laionmi_pitfall_finetune.yaml", *common, "--run_name", "finetuned", "--overwrite", "true")
    rsgm("test", "--config", "configs/laionmi_pitfall_digits.yaml", *common, "--run_name", "attack", "--overwrite", "true")
    tables = sorted((ROOT / args.run_dir / "attack").glob("test-*/laionmi/threshold.csv"))
    if not tables:
        raise SystemExit(f"reproduce ch7: no laionmi/threshold.csv under {args.run_dir}/attack/test-*")
    best = {(r["target"], r["method"], r["signal"]): r for r in read_csv(tables[-1])}
    rows = []
    for method, signal, label, laion, pokemon in THESIS:
        large, tuned = best.get(("large", method, signal)), best.get(("finetuned", method, signal))
        step = f" ({tuned['step']})" if tuned is not None and tuned["step"] not in ("", "gen") else ""
        rows.append([label, laion, pct(large, "tpr"), pct(large, "auc"), pokemon, pct(tuned, "tpr") + step, pct(tuned, "auc")])
    print_table("Table 7.7.1, TPR@1 %FPR (%): thesis (SD-v1.4) beside rsgm's digits stand-ins (mean ± std over 100 subsets)",
                ["attack", "thesis LAION-mi", "rsgm large TPR", "rsgm large AUC", "thesis POKEMON", "rsgm fine-tuned TPR", "rsgm fine-tuned AUC"],
                rows, note=f"rsgm: 200 + 200 samples per target, 100 subsets of 100 + 100, 1 noise pass; best step per row. "
                           f"{time.perf_counter() - start:.0f} s in all.")
    sd = rsgm("test", "--config", "configs/laionmi_sd14.yaml", *common, "--run_name", "sd14", check=False)
    reason = (sd.stderr.strip().splitlines() or ["(no message)"])[-1] if sd.returncode else "ran (the data and weights are present)"
    print_table("Rows that need LAION-mi and SD-v1.4 (Tables 7.7.1 LAION-mi column, 7.5.1, B.4.2, B.4.3)",
                ["command", "exit status", "what it said"], [["rsgm test --config configs/laionmi_sd14.yaml", sd.returncode, reason]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
