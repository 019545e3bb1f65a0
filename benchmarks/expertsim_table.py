"""ExpertSim against the single-model baselines on the synthetic ZDC (thesis Tables 5.4.2,
5.5.1 and 5.5.3) under one fixed training budget.

Every row is a base config from ``configs/`` plus its overlay (``ROWS``) run through the ``rsgm`` command: ``fit``
for ``--max-steps`` training batches (load-independent: every model gets the same number of
generator updates; ``BatchBudget`` turns it into ``trainer.max_steps``) or, without it, for
``--budget-s`` seconds of training (``trainer.max_time``: how far a model gets then depends on
the machine's load), then ``test`` on the whole test split. All rows share the data (same simulator seed and split), the compact generator
(``--width``), the learning rates and the evaluation; only the model seed changes between
repetitions. The table gives the mean channel W1 (and per intensity quartile), the
classifier AUC on pixels and on high-level features (0.5 = indistinguishable), FPD and KPD
(``rsgm.metrics.fidelity``) as mean ± std over seeds, the training steps each run managed, and for ExpertSim rows the
smallest expert share and the experts' mean generated intensities (Table 5.5.1); each seed's line
also gives the mean real intensity of the conditions routed to each expert.

    python benchmarks/expertsim_table.py --max-steps 200 --seeds 0 1 2
    python benchmarks/expertsim_table.py --budget-s 300 --seeds 0 1 2
    python benchmarks/expertsim_table.py --rows zdc_gan expertsim expertsim_no_ldiff expertsim_no_lutil

Any further ``--section.key value`` arguments go last to every ``rsgm`` call, e.g.
``--model.expert_loss_routing raw`` (ExpertSim rows only then), or
``--trainer.max_epochs 4 --budget-s 36000`` to compare whole epochs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from tqdm.auto import tqdm

from rsgm.cli import main as rsgm

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Row name -> the base config and overlays (configs/ablations/, configs/baselines/) it runs.
ROWS = {
    "zdc_gan": ["sdigan_zdc.yaml", "baselines/gan.yaml"],
    "zdc_sdigan": ["sdigan_zdc.yaml"],
    "zdc_sdigan_ir": ["sdigan_zdc.yaml", "baselines/ir.yaml"],
    "zdc_sdigan_ir_ar": ["sdigan_zdc.yaml", "baselines/ir_ar.yaml"],
    "expertsim": ["expertsim.yaml"],
    **{f"expertsim_{p.stem}": ["expertsim.yaml", f"ablations/{p.name}"] for p in sorted((CONFIGS / "ablations").glob("*.yaml"))},
}
# Classifier AUC on pixels / high-level features, FPD and KPD (rsgm.metrics.fidelity), logged at test.
FIDELITY = ("auc_low", "auc_high", "fpd", "kpd")
DEFAULT_ROWS = ["zdc_gan", "zdc_sdigan", "zdc_sdigan_ir", "zdc_sdigan_ir_ar", "expertsim", "expertsim_no_ldiff",
                "expertsim_no_lutil"]


class BatchBudget(Callback):
    """Train for ``batches`` training batches, whatever the machine's load.

    Both ZDC modules optimise manually, and under manual optimisation Lightning's
    ``trainer.max_steps`` counts every ``optimizer.step()``: each training batch steps every
    optimizer once (discriminator, generator, the aux regressor where there is one and
    ExpertSim's router), so ``max_steps`` is ``batches`` times the number of optimizers, and
    ``batches`` is the number of generator updates. ``max_epochs`` becomes the epochs those
    batches span, so epoch-based schedules (ExpertSim's Gumbel temperature, annealed over
    ``max_epochs``) run their whole course.
    """

    def __init__(self, batches: int) -> None:
        self.batches = batches

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        per_batch = 1 if pl_module.automatic_optimization else len(trainer.optimizers)
        trainer.fit_loop.epoch_loop.max_steps = self.batches * per_batch
        trainer.fit_loop.max_epochs = math.ceil(self.batches / trainer.num_training_batches)


def budget_args(args: argparse.Namespace) -> list[str]:
    """The ``rsgm fit`` arguments of the training budget: ``--max-steps`` batches when given,
    else ``--budget-s`` seconds."""
    if args.max_steps:
        return ["--trainer.callbacks+=expertsim_table.BatchBudget", f"--trainer.callbacks.batches={args.max_steps}"]
    return ["--trainer.max_epochs", "10000", "--trainer.max_time", _max_time(args.budget_s)]


def budget_text(args: argparse.Namespace) -> str:
    return (f"{args.max_steps} training batches (generator updates) per run" if args.max_steps
            else f"{args.budget_s} s training per run (wall clock)")


def run_row(row: str, seed: int, args: argparse.Namespace, root: Path) -> dict:
    expert = row.startswith("expertsim")
    configs = [a for c in ROWS[row] for a in ("--config", str(CONFIGS / c))]
    common = [*configs, "--logger", "csv", "--run_dir", str(root), "--run_name", f"{row}-s{seed}",
              "--seed_everything", str(seed), "--data.n_synthetic", str(args.n_synthetic), "--data.batch_size", str(args.batch_size),
              "--data.eval_batch_size", "1024", "--model.generator.init_args.width", str(args.width),
              "--model.lr_g", str(args.lr_g), "--model.lr_d", str(args.lr_d), "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false"]
    if expert:
        common += ["--model.lr_router", str(args.lr_router)]
    os.environ.pop("RSGM_RUN_DIR", None)
    rsgm(["fit", *common, *budget_args(args), "--trainer.limit_val_batches", "0", *args.rsgm_args])
    fit_dir = max((root / f"{row}-s{seed}").glob("fit-*"))
    ckpt = fit_dir / "checkpoints" / "last.ckpt"
    loops = torch.load(ckpt, map_location="cpu", weights_only=True)["loops"]
    steps = int(loops["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"])  # training batches
    if args.max_steps and steps != args.max_steps:
        raise RuntimeError(f"{row} seed {seed} trained {steps} batches, not --max-steps {args.max_steps}")
    os.environ.pop("RSGM_RUN_DIR", None)
    rsgm(["test", *common, "--ckpt_path", str(ckpt), *args.rsgm_args])
    test_dir = max((root / f"{row}-s{seed}").glob("test-*"))
    result = json.loads((test_dir / "test_channel_w1.json").read_text())
    out = {"w1": result["test/w1_mean"], "q": [result[f"test/w1_q{q}"] for q in range(1, 5)], "steps": steps,
           **{k: result[f"test/{k}"] for k in FIDELITY}}
    if expert:
        experts = json.loads((test_dir / "test_experts.json").read_text())
        out["min_share"] = min(e["share"] for e in experts)
        out["means"] = [e["mean_intensity"] for e in experts]
        out["real_means"] = [e["real_mean_intensity"] for e in experts]
    return out


def _max_time(seconds: int) -> str:
    return f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def fmt(values: list[float], digits: int = 2) -> str:
    a = np.asarray(values, dtype=float)
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=sorted(ROWS), metavar="ROW",
                        help=f"rows to run, from {sorted(ROWS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget-s", type=int, default=300, help="training seconds per run (trainer.max_time); "
                        "depends on the machine's load: prefer --max-steps")
    parser.add_argument("--max-steps", type=int, default=0, help="training batches (generator updates) per run; "
                        "takes precedence over --budget-s")
    parser.add_argument("--n-synthetic", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=float, default=0.125, help="generator width (1.0 = thesis size)")
    parser.add_argument("--lr-g", type=float, default=1e-3)
    parser.add_argument("--lr-d", type=float, default=1e-4)
    parser.add_argument("--lr-router", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    args, args.rsgm_args = parser.parse_known_args()
    if any(a.startswith("--") and not a.startswith(("--model.", "--data.", "--trainer.")) for a in args.rsgm_args):
        parser.error(f"unknown arguments {args.rsgm_args}; only --model.*, --data.* and --trainer.* pass through to rsgm")
    if args.max_steps < 0 or args.budget_s < 1:
        parser.error("--max-steps must be >= 0 (0: use --budget-s) and --budget-s >= 1")
    torch.set_num_threads(args.threads)

    # Without --out the runs (about 90 MB of checkpoints) go to a temporary folder removed at the end.
    with tempfile.TemporaryDirectory(prefix="expertsim_table_") as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        results = run_all(args, root)
    report(args, results, root if args.out else None)


def run_all(args: argparse.Namespace, root: Path) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {}
    runs = [(row, seed) for row in args.rows for seed in args.seeds]
    for row, seed in tqdm(runs, desc="expertsim table runs", unit="run"):
        results.setdefault(row, []).append(run_row(row, seed, args, root))
        r = results[row][-1]
        experts = (f", min share {r['min_share']:.2f}, expert means {[round(m, 1) for m in r['means']]}"
                   f", real means of routed conditions {[round(m, 1) for m in r['real_means']]}") if "means" in r else ""
        tqdm.write(f"[{row} seed {seed}] w1 {r['w1']:.3f}, AUC pixels {r['auc_low']:.3f}, AUC features "
                   f"{r['auc_high']:.3f}, FPD {r['fpd']:.4f}, KPD {r['kpd']:.5f}, batches {r['steps']}{experts}")
    return results


def report(args: argparse.Namespace, results: dict[str, list[dict]], kept: Path | None) -> None:

    print(f"\nsynthetic ZDC neutron, {args.n_synthetic} samples, width {args.width}, {budget_text(args)}, "
          f"seeds {args.seeds}")
    header = (f"{'model':<22} {'W1 mean':>14} {'Q1':>8} {'Q2':>8} {'Q3':>8} {'Q4':>8} {'AUC pixels':>15} {'AUC features':>15} "
              f"{'FPD':>17} {'KPD':>19} {'batches':>7} {'min share':>9}  expert mean intensities")
    print(header)
    print("-" * len(header))
    for row, rs in results.items():
        q = np.array([r["q"] for r in rs]).mean(0)
        line = (f"{row:<22} {fmt([r['w1'] for r in rs]):>14} " + " ".join(f"{v:>8.2f}" for v in q)
                + f" {fmt([r['auc_low'] for r in rs], 3):>15} {fmt([r['auc_high'] for r in rs], 3):>15}"
                + f" {fmt([r['fpd'] for r in rs], 4):>17} {fmt([r['kpd'] for r in rs], 5):>19}"
                + f" {np.mean([r['steps'] for r in rs]):>7.0f}")
        if "means" in rs[0]:
            means = np.array([r["means"] for r in rs], dtype=float)
            line += f" {min(r['min_share'] for r in rs):>9.2f}  " + " / ".join(f"{m:.0f}" for m in np.nanmean(means, 0))
        print(line)
    if kept is not None:
        print(f"runs kept in {kept}")


if __name__ == "__main__":
    main()
