"""Report of the IAR privacy audit (:class:`rsgm.lightning_modules.iar_attack.IARAttack`).

From ``pl_module.results`` it writes under ``<run dir>/iar/``:

* ``mia.csv``: per MIA family, the hyperparameter chosen on the validation split and
  TPR@FPR=1 % / AUC (mean and std over ``repeats`` random evaluations on the other rows),
  for the conditional logits (``cond_*``) and the CFG difference (``cfg_*``); the log-log
  ROC plot ``iar_roc``;
* ``di.csv``: min |P| (mean p <= alpha over ``trials`` subsets, grid 2..10, 20..100, 200..)
  for the LLM-DI baseline (linear scorer on the conditional MIAs), the optimised procedure
  (MinMax + sum) on the same MIAs, and with the tailored (CFG) MIAs added; ``di_null.json``:
  the false-positive rate of the tailored procedure on non-member-only P;
* ``extraction.json`` and the plot ``iar_extraction`` (completions above originals);
* ``mitigation.csv`` and the plot ``iar_mitigation``: MIA TPR, DI min |P| and utility per sigma;
* ``comparison.csv`` and the plot ``iar_vs_dm`` when a reference DM was audited alongside;
* ``summary.json`` with the headline numbers (also logged as ``iar/...`` metrics).
"""

from __future__ import annotations

import csv
import json

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer

from rsgm.metrics.membership import membership_roc
from rsgm.privacy import iar_di as D
from rsgm.privacy import iar_mia as M
from rsgm.utils.figures import plt, run_dir, save_figure


def _write_csv(path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def best_of(results: list[M.MIAResult], prefix: str) -> M.MIAResult | None:
    """The family with the best *validation* TPR among names starting with ``prefix``
    (the choice never looks at the reported rows)."""
    cands = [r for r in results if r.name.startswith(prefix)]
    return max(cands, key=lambda r: (r.val_tpr, r.auc_mean)) if cands else None


def matched_setting(sweep: list[dict], target_accuracy: float | None) -> dict | None:
    """The sampling setting whose utility accuracy is closest to ``target_accuracy`` (ties: lower FID)."""
    if not sweep or target_accuracy is None:
        return None
    return min(sweep, key=lambda row: (abs(row["accuracy"] - target_accuracy), row["fid"]))


class IARReport(Callback):
    def __init__(self, repeats: int = 100, fpr: float = 0.01, val_fraction: float = 0.3, trials: int = 1000,
                 alpha: float = 0.01, null_trials: int = 1000, linear_trials: int | None = None,
                 mitigation_repeats: int | None = None, seed: int = 0) -> None:
        self.repeats, self.fpr, self.val_fraction, self.seed = repeats, fpr, val_fraction, seed
        self.mitigation_repeats = mitigation_repeats or repeats
        self.trials, self.alpha, self.null_trials = trials, alpha, null_trials
        self.linear_trials = linear_trials or trials

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        res = getattr(pl_module, "results", None)
        if res is None or not trainer.is_global_zero:
            return
        folder = run_dir(trainer) / "iar"
        folder.mkdir(parents=True, exist_ok=True)
        summary = self.run(res, trainer, folder)
        (folder / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"iar/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float)) and v is not None})
        print("\nIAR audit summary\n" + "\n".join(f"  {k}: {v}" for k, v in summary.items()))

    # ------------------------------------------------------------------ parts

    def mia(self, names, F, y, repeats: int | None = None) -> list[M.MIAResult]:
        val = M.validation_mask(y, self.val_fraction, self.seed)
        return M.select_and_evaluate(names, F, y, val, repeats or self.repeats, self.fpr, self.seed)

    def di(self, names, F, y) -> dict:
        mem, non = F[y.bool()], F[~y.bool()]
        cond = [j for j, n in enumerate(names) if n.startswith("cond_")]
        out = {}
        out["llm_di_linear_cond"], _ = D.min_suspect_size(mem[:, cond], non[:, cond], "linear", trials=self.linear_trials, alpha=self.alpha, seed=self.seed, progress=True)
        out["sum_cond"], _ = D.min_suspect_size(mem[:, cond], non[:, cond], "sum", trials=self.trials, alpha=self.alpha, seed=self.seed)
        out["sum_cond_cfg"], _ = D.min_suspect_size(mem, non, "sum", trials=self.trials, alpha=self.alpha, seed=self.seed)
        return out

    def run(self, res: dict, trainer: Trainer, folder) -> dict:
        names, F, y = res["names"], res["features"].double(), res["is_member"]
        print("IAR report: membership inference ...", flush=True)
        results = self.mia(names, F, y)
        _write_csv(folder / "mia.csv", [{"mia": r.name, "val_tpr": r.val_tpr, "tpr_mean": r.tpr_mean, "tpr_std": r.tpr_std,
                                          "auc_mean": r.auc_mean, "auc_std": r.auc_std} for r in results])
        bc, bt = best_of(results, "cond_"), best_of(results, "cfg_")
        summary = {"model": res.get("label"), "members": int(y.sum()), "nonmembers": int((y == 0).sum()),
                   "best_cond_mia": bc.name, "best_cond_tpr": bc.tpr_mean, "best_cond_auc": bc.auc_mean,
                   "best_cfg_mia": bt.name, "best_cfg_tpr": bt.tpr_mean, "best_cfg_auc": bt.auc_mean}
        self._roc(trainer, names, F, y, [bc, bt])
        print("IAR report: dataset inference ...", flush=True)
        di = self.di(names, F, y)
        _write_csv(folder / "di.csv", [{"procedure": k, "min_P": v} for k, v in di.items()])
        summary.update({f"di_{k}": v for k, v in di.items()})
        n_null = di["sum_cond_cfg"] or 100
        null = D.null_false_positive_rate(F[~y.bool()], min(n_null, int((y == 0).sum()) // 2), self.null_trials, self.alpha, "sum", self.seed)
        (folder / "di_null.json").write_text(json.dumps({k: v for k, v in null.items() if k != "p_values"}))
        summary["di_null_fpr"], summary["di_null_n"] = null["false_positive_rate"], null["n_p"]
        calls = res.get("calls", {})
        n = len(y)
        summary["forward_passes_per_sample"] = calls.get("forward", 0) / max(n, 1)
        if "extraction" in res:
            summary.update(self._extraction(trainer, res, folder))
        if res.get("noisy") or res.get("utility"):
            print("IAR report: mitigation ...", flush=True)
            summary.update(self._mitigation(trainer, res, folder, bc, bt, di))
        if res.get("sampling_sweep"):
            _write_csv(folder / "sampling_sweep.csv", [{"setting": json.dumps({k: v for k, v in row.items() if k not in ("accuracy", "fid")}),
                                                        "utility_accuracy": row["accuracy"], "fid": row["fid"]} for row in res["sampling_sweep"]])
        if "dm" in res:
            summary.update(self._comparison(trainer, res, folder, best_of(results, ""), di, summary))
        return summary

    def _roc(self, trainer, names, F, y, picks) -> None:
        fig, ax = plt.subplots(figsize=(5, 4.5))
        for r in picks:
            s = M.fill_nan_low(F[:, names.index(r.name)])
            f, t, _ = membership_roc(s, y)
            ax.plot(np.clip(f.numpy(), 1e-4, 1), np.clip(t.numpy(), 1e-4, 1), label=f"{r.name} (AUC {100 * r.auc_mean:.1f})")
        ax.plot([1e-4, 1], [1e-4, 1], "k:", lw=0.8)
        ax.axvline(self.fpr, color="grey", lw=0.6)
        ax.set(xscale="log", yscale="log", xlabel="FPR", ylabel="TPR", title="IAR membership ROC (all rows)")
        ax.legend(fontsize=7)
        save_figure(trainer, fig, "iar_roc")

    def _extraction(self, trainer, res, folder) -> dict:
        ext = res["extraction"]
        info = {"extracted": ext.count, "validation_false_positives": ext.validation_false_positives,
                "threshold": ext.threshold, "candidates": len(ext.train_rows), "validation_candidates": len(ext.val_rows),
                "train_sim_max": float(ext.train_sims.max()) if len(ext.train_sims) else None}
        (folder / "extraction.json").write_text(json.dumps(info, indent=1))
        keep = ext.train_sims > ext.threshold
        gen, orig = ext.train_images[keep][:16], res["extraction_originals"][:16]
        if len(gen):
            fig, axes = plt.subplots(2, len(gen), figsize=(0.8 * len(gen) + 0.5, 1.8), squeeze=False)
            for j in range(len(gen)):
                for i, im in enumerate((gen[j], orig[j])):
                    axes[i, j].imshow(im[0].numpy(), cmap="gray_r", vmin=-1, vmax=1)
                    axes[i, j].axis("off")
            fig.suptitle("extracted (top) vs training original (bottom)", fontsize=8)
            save_figure(trainer, fig, "iar_extraction")
        return {f"extraction_{k}": v for k, v in info.items()}

    def _mitigation(self, trainer, res, folder, best_cond, best_cfg, di) -> dict:
        """Per sigma: the best CFG-difference MIA (``mia``, ``tpr``) and the best conditional one
        (``cond_mia``, ``cond_tpr``), each chosen on validation, and DI with all MIAs."""
        names, y = res["names"], res["is_member"]
        util = res.get("utility", {})
        rows = [{"sigma": 0.0, "mia": best_cfg.name, "tpr": best_cfg.tpr_mean, "cond_mia": best_cond.name, "cond_tpr": best_cond.tpr_mean,
                 "di_min_P": di["sum_cond_cfg"], "utility_accuracy": util.get(0.0, {}).get("accuracy"), "fid": util.get(0.0, {}).get("fid")}]
        for sigma, Fs in res.get("noisy", {}).items():
            results = self.mia(names, Fs.double(), y, self.mitigation_repeats)
            b, bc = best_of(results, "cfg_"), best_of(results, "cond_")
            size, _ = D.min_suspect_size(Fs[y.bool()].double(), Fs[~y.bool()].double(), "sum", trials=self.trials, alpha=self.alpha, seed=self.seed)
            rows.append({"sigma": sigma, "mia": b.name, "tpr": b.tpr_mean, "cond_mia": bc.name, "cond_tpr": bc.tpr_mean, "di_min_P": size,
                         "utility_accuracy": util.get(sigma, {}).get("accuracy"), "fid": util.get(sigma, {}).get("fid")})
        _write_csv(folder / "mitigation.csv", rows)
        if 0.0 in util:
            from rsgm.lightning_modules.iar import grid_figure

            x = util[0.0]["samples"]
            per = len(x) // 10
            save_figure(trainer, grid_figure(x.view(10, per, *x.shape[1:])[:, :8].reshape(-1, *x.shape[1:]), 10, "samples used for utility"), "iar_utility_samples")
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
        for r in rows:
            u = r["utility_accuracy"] if r["utility_accuracy"] is not None else np.nan
            a1.scatter(u, 100 * r["tpr"])
            a1.annotate(f"σ={r['sigma']:g}", (u, 100 * r["tpr"]), fontsize=7)
            a2.scatter(u, r["di_min_P"] if r["di_min_P"] else np.nan)
            a2.annotate(f"σ={r['sigma']:g}", (u, r["di_min_P"] or np.nan), fontsize=7)
        a1.set(xlabel="utility (classifier accuracy of samples)", ylabel="TPR@1%FPR (%)", title="MIA vs utility")
        a2.set(xlabel="utility (classifier accuracy of samples)", ylabel="DI min |P| (missing: not reached)", title="DI vs utility")
        if any(r["di_min_P"] for r in rows):
            from matplotlib.ticker import NullFormatter

            a2.set_yscale("log")
            a2.yaxis.set_minor_formatter(NullFormatter())
        fig.tight_layout()
        save_figure(trainer, fig, "iar_mitigation")
        out = {f"mitigation_sigma{r['sigma']:g}_{k}": r[k] for r in rows for k in ("tpr", "cond_tpr", "di_min_P", "utility_accuracy", "fid")}
        out["fid_real_floor"] = res.get("fid_real")
        return out

    def _comparison(self, trainer, res, folder, best_iar, di, summary) -> dict:
        """IAR (its best MIA over conditional and CFG features, chosen on validation) vs the DM."""
        dm = res["dm"]
        y = res["is_member"]
        Fd = dm["features"].double()
        b = max(self.mia(dm["names"], Fd, y), key=lambda z: (z.val_tpr, z.auc_mean))
        size, _ = D.min_suspect_size(Fd[y.bool()], Fd[~y.bool()], "sum", trials=self.trials, alpha=self.alpha, seed=self.seed)
        util = res.get("utility", {}).get(0.0, {})
        rows = [{"model": res.get("label"), "type": "IAR", "mia": best_iar.name, "tpr_at_1fpr": best_iar.tpr_mean, "auc": best_iar.auc_mean,
                 "di_min_P": di["sum_cond_cfg"], "extracted": summary.get("extraction_extracted"), "utility_accuracy": util.get("accuracy"),
                 "fid": util.get("fid")},
                {"model": dm["label"], "type": "DM", "mia": b.name, "tpr_at_1fpr": b.tpr_mean, "auc": b.auc_mean,
                 "di_min_P": size, "extracted": None, "utility_accuracy": res.get("dm_utility"), "fid": res.get("dm_fid")}]
        match = matched_setting(res.get("sampling_sweep") or [], res.get("dm_utility"))
        if match is not None:  # the same IAR (same leakage), sampled at the setting whose utility is closest to the DM's
            setting = {k: v for k, v in match.items() if k not in ("accuracy", "fid")}
            rows.insert(1, {**rows[0], "model": f"{res.get('label')} {json.dumps(setting)}", "utility_accuracy": match["accuracy"], "fid": match["fid"]})
        _write_csv(folder / "comparison.csv", rows)
        fig, ax = plt.subplots(figsize=(4.5, 3.6))
        for row in rows[:1] + rows[-1:]:
            ax.scatter(row["di_min_P"] or np.nan, 100 * row["tpr_at_1fpr"], s=40, marker="o" if row["type"] == "IAR" else "s")
            ax.annotate(row["model"], (row["di_min_P"] or np.nan, 100 * row["tpr_at_1fpr"]), fontsize=8)
        if any(row["di_min_P"] for row in rows):
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on a short log range
        ax.set(xlabel="DI min |P| (lower = more leakage)", ylabel="TPR@1%FPR (%)", title="IAR vs DM on digits")
        fig.tight_layout()
        save_figure(trainer, fig, "iar_vs_dm")
        out = {"dm_best_mia": b.name, "dm_tpr": b.tpr_mean, "dm_auc": b.auc_mean, "dm_di_min_P": size,
               "dm_utility_accuracy": res.get("dm_utility"), "dm_fid": res.get("dm_fid")}
        if match is not None:
            out.update({"matched_setting": json.dumps(setting), "matched_utility_accuracy": match["accuracy"], "matched_fid": match["fid"]})
        return out
