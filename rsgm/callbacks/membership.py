"""Per-feature membership-inference metrics at test end: TPR@FPR, AUC, log-log ROC plot.

Works with any LightningModule that leaves ``self.results = {names, features, is_member,
...}`` after its test epoch (one row per sample, raw features "lower = member", as
methods_spec §5.3). Each single feature is scored directly (score = -feature). The
combined "lr_all" row scores every sample with a StandardScaler + logistic regression on
all features under 5-fold cross-fitting, so no sample is scored by a model that saw it.
"""

from __future__ import annotations

import csv

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from rsgm.metrics.membership import membership_auc, membership_roc, tpr_at_fpr
from rsgm.privacy.safe_files import save_tensors
from rsgm.privacy.stats import cross_fit_scores
from rsgm.utils.dashboard import log_table
from rsgm.utils.figures import run_dir, save_roc_figure

SCORES_KIND = "rsgm.mia_scores"  # read back with rsgm.privacy.safe_files.load_tensors(path, SCORES_KIND)


def per_feature_mia(names: list[str], features: torch.Tensor, is_member: torch.Tensor, fpr: float = 0.01, seed: int = 0) -> list[dict]:
    """TPR@FPR and AUC of every single feature (score = -feature) and of the cross-fitted
    logistic regression over all features. Returns rows with the scores attached."""
    y = is_member.bool()
    rows = []
    for j, name in enumerate(names):
        s = -features[:, j].double()
        rows.append({"feature": name, "tpr_at_fpr": float(tpr_at_fpr(s, y, fpr)), "auc": float(membership_auc(s, y)), "scores": s})
    F = features.double().numpy()
    sP, sU = cross_fit_scores(F[y.numpy()], F[~y.numpy()], k=5, seed=seed)
    s = torch.empty(len(y), dtype=torch.float64)
    s[y], s[~y] = torch.from_numpy(sP), torch.from_numpy(sU)
    rows.append({"feature": "lr_all", "tpr_at_fpr": float(tpr_at_fpr(s, y, fpr)), "auc": float(membership_auc(s, y)), "scores": s})
    return rows


class MembershipMetrics(Callback):
    """Writes ``mia/metrics.csv`` and ``mia/scores.safetensors``, logs ``mia/<feature>/tpr_at_<fpr>fpr``
    and ``mia/<feature>/auc``, and saves the log-log ROC plot ``mia_roc``."""

    def __init__(self, fpr: float = 0.01, plot: bool = True, seed: int = 0) -> None:
        self.fpr, self.plot, self.seed = fpr, plot, seed

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = run_dir(trainer) / "mia"
        res = getattr(pl_module, "results", None)
        if res is None or not trainer.is_global_zero:
            return
        rows = per_feature_mia(res["names"], res["features"], res["is_member"], self.fpr, self.seed)
        folder.mkdir(parents=True, exist_ok=True)
        pct = f"{100 * self.fpr:g}%"
        with open(folder / "metrics.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["feature", f"tpr_at_{pct}_fpr", "auc"])
            for r in rows:
                w.writerow([r["feature"], f"{r['tpr_at_fpr']:.6f}", f"{r['auc']:.6f}"])
        save_tensors(folder / "scores.safetensors", SCORES_KIND, {r["feature"]: r["scores"] for r in rows} | {"is_member": res["is_member"], "index": res["index"]},
                     {"features": [r["feature"] for r in rows]})
        if trainer.logger is not None:
            metrics = {}
            for r in rows:
                metrics[f"mia/{r['feature']}/tpr_at_{pct}fpr"] = r["tpr_at_fpr"]
                metrics[f"mia/{r['feature']}/auc"] = r["auc"]
            trainer.logger.log_metrics(metrics)
        log_table(trainer, "mia_metrics", [{"feature": r["feature"], f"tpr_at_{pct}_fpr": r["tpr_at_fpr"], "auc": r["auc"]} for r in rows])
        print(f"\nPer-feature MIA ({int(res['is_member'].sum())} members, {int((res['is_member'] == 0).sum())} non-members)")
        print(f"{'feature':<12}{'TPR@' + pct + 'FPR':>14}{'AUC':>8}")
        for r in rows:
            print(f"{r['feature']:<12}{100 * r['tpr_at_fpr']:>13.2f}%{100 * r['auc']:>7.2f}%")
        if self.plot:
            self._plot(trainer, rows, res["is_member"])

    def _plot(self, trainer: Trainer, rows: list[dict], is_member: torch.Tensor) -> None:

        # One curve per feature group: the single feature with the best AUC represents it.
        best: dict[str, dict] = {}
        for r in rows:
            g = r["feature"].split("_")[0] if r["feature"] != "lr_all" else "lr_all"
            if g not in best or r["auc"] > best[g]["auc"]:
                best[g] = r
        curves = {f"{r['feature']} (AUC {100 * r['auc']:.1f})": membership_roc(r["scores"], is_member)[:2] for r in best.values()}
        save_roc_figure(trainer, curves, self.fpr, "Membership ROC per feature", "mia_roc")
