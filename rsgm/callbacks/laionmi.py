"""LAION-mi report at test end: Table 7.7.1 / B.4.2 (threshold attacks), Table B.4.3
(classifier attacks), per-step curves (Fig. B.4.1) and a log-log ROC plot.

Reads ``pl_module.results = {target: {names, features, is_member, index}}`` as left by
:class:`rsgm.lightning_modules.laionmi_attack.LaionMIAttack`. Writes under the run folder:
``laionmi/threshold.csv`` (best step per method and signal), ``laionmi/threshold_per_step.csv``,
``laionmi/classifier.csv``, ``laionmi/subsets.pt`` and ``plots/laionmi_roc.png``.
"""

from __future__ import annotations

import csv

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from rsgm.metrics.laionmi import classifier_attack, threshold_table
from rsgm.metrics.membership import membership_roc
from rsgm.privacy.laionmi_attacks import balanced_subsets
from rsgm.utils.figures import run_dir, save_roc_figure


def _write(path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in r.items()})


class LaionMIReport(Callback):
    """Args:
        fpr: operating point of the TPR (0.01).
        classifiers: classifier attacks to run, from lr, dtc, rfc, nn ([] for none).
        classifier_fits: number of fits (default: one per evaluation subset, 100).
        train_per_class: training members (and non-members) per fit (None: all outside the subset).
        classifier_methods: methods the classifiers run on (None: every non-generation method).
    """

    def __init__(self, fpr: float = 0.01, classifiers: list[str] = ("lr", "nn"), classifier_fits: int | None = None,
                 train_per_class: int | None = None, classifier_methods: list[str] | None = None, plot: bool = True, seed: int = 0) -> None:
        self.fpr, self.classifiers, self.classifier_fits = fpr, list(classifiers), classifier_fits
        self.train_per_class, self.classifier_methods, self.plot, self.seed = train_per_class, classifier_methods, plot, seed

    def _subsets(self, pl_module, res) -> list[np.ndarray]:
        idx, y = res["index"].numpy(), res["is_member"].numpy()
        fixed = getattr(pl_module, "eval_subsets", None)
        if fixed is not None:
            return [np.searchsorted(idx, s) for s in fixed]
        hp = pl_module.hparams
        per = min(hp.subset_size, int(y.sum()), int((1 - y).sum()))
        return balanced_subsets(y, hp.subsets, per, self.seed)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        results = getattr(pl_module, "results", None)
        if not results or not trainer.is_global_zero:
            return
        folder = run_dir(trainer) / "laionmi"
        folder.mkdir(parents=True, exist_ok=True)
        best_rows, step_rows, clf_rows, rocs, saved = [], [], [], {}, {}
        for target, res in results.items():
            names, F, y = res["names"], res["features"].numpy(), res["is_member"].numpy()
            subsets = self._subsets(pl_module, res)
            saved[target] = subsets
            best, steps = threshold_table(names, F, y, subsets, self.fpr)
            best_rows += [{"target": target, **r} for r in best]
            step_rows += [{"target": target, **r} for r in steps]
            top = max(best, key=lambda r: r["tpr_mean"])
            col = names.index(f"{top['method']}/{top['signal']}/{top['step']}")
            rocs[target] = (top, membership_roc(-torch.from_numpy(F[:, col]), torch.from_numpy(y)))
            methods = self.classifier_methods or sorted({n.split("/")[0] for n in names if not n.endswith("/gen")})
            fits = subsets[: self.classifier_fits or len(subsets)]
            for m in methods if self.classifiers else []:
                cols = [j for j, n in enumerate(names) if n.startswith(m + "/")]
                out = classifier_attack(F[:, cols], y, fits, self.classifiers, self.train_per_class, self.fpr, self.seed)
                for kind, d in out.items():
                    clf_rows.append({"target": target, "method": m, "classifier": kind, "fits": len(fits),
                                     "tpr_mean": float(d["tpr"].mean()), "tpr_std": float(d["tpr"].std()),
                                     "auc_mean": float(d["auc"].mean()), "auc_std": float(d["auc"].std())})
        _write(folder / "threshold.csv", best_rows)
        _write(folder / "threshold_per_step.csv", step_rows)
        _write(folder / "classifier.csv", clf_rows)
        torch.save({k: [torch.from_numpy(s) for s in v] for k, v in saved.items()}, folder / "subsets.pt")
        self.tables = {"threshold": best_rows, "per_step": step_rows, "classifier": clf_rows}
        self._print(best_rows, clf_rows)
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"laionmi/{r['target']}/{r['method']}/{r['signal']}/tpr": float(r["tpr_mean"]) for r in best_rows})
        if self.plot:
            self._plot(trainer, rocs)

    def _print(self, best_rows, clf_rows) -> None:
        pct = f"{100 * self.fpr:g}%"
        print("\nLAION-mi threshold attacks (mean +- std over subsets; best step per method and signal)")
        print(f"{'target':<12}{'method':<38}{'signal':<14}{'step':<7}{'TPR@' + pct + 'FPR':>16}{'AUC':>16}")
        for r in best_rows:
            print(f"{r['target']:<12}{r['method']:<38}{r['signal']:<14}{r['step']:<7}"
                  f"{100 * r['tpr_mean']:>9.2f}+-{100 * r['tpr_std']:<5.2f}{100 * r['auc_mean']:>9.2f}+-{100 * r['auc_std']:<5.2f}")
        if clf_rows:
            print("\nLAION-mi classifier attacks")
            for r in clf_rows:
                print(f"{r['target']:<12}{r['method']:<38}{r['classifier']:<14}{r['fits']:<7}"
                      f"{100 * r['tpr_mean']:>9.2f}+-{100 * r['tpr_std']:<5.2f}{100 * r['auc_mean']:>9.2f}+-{100 * r['auc_std']:<5.2f}")

    def _plot(self, trainer: Trainer, rocs: dict) -> None:
        curves = {f"{target}: {r['method']} {r['signal']} {r['step']} (TPR@{100 * self.fpr:g}% {100 * r['tpr_mean']:.1f})": (f, t)
                  for target, (r, (f, t, _)) in rocs.items()}
        save_roc_figure(trainer, curves, self.fpr, "Membership ROC (best threshold attack)", "laionmi_roc", fontsize=6)
