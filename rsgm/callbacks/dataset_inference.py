"""Dataset inference (CDI, methods_spec §5.2 and §5.6) at test end, from per-sample features.

Model-agnostic: it needs only ``pl_module.results = {names, features, is_member,
in_suspect, index}`` and, optionally, ``results["access"]`` (feature -> "gray"/"white");
``existing_groups`` names the prior-work feature groups (column-name prefix before "_")
for the ablation. Pools: members are rows with ``is_member = 1``, non-members the rest.
Computed:

* the configured audit: one CDI run on the datamodule's P (``in_suspect = 1``) vs U;
* mean p-value vs |P| (|U| = |P|) with its 95 % interval over ``trials`` random subsets,
  for all features and for the gray-box ones, and the min |P| with mean p < alpha;
* the null experiment: P and U both non-members, false-positive rate at alpha;
* p-value -> TPR@FPR=alpha at min |P|: empirically (member runs vs null runs) and by the
  power conversion of App. C.17;
* the contamination curve (P mixes members and non-members at ratio r);
* the feature-set ablation: min |P| for existing MIAs alone, each new feature group alone
  and added to the existing ones, and all features.

Everything is written under ``<run dir>/cdi/`` and logged as ``cdi/...`` metrics.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from tqdm.auto import tqdm

from rsgm.privacy import stats as S
from rsgm.utils.dashboard import log_table
from rsgm.utils.figures import plt, run_dir, save_figure

def _group(name: str) -> str:
    """Feature group of a column name: 'gm_t300' -> 'gm'."""
    return name.split("_")[0]


def _search_min_size(members, nonmembers, sizes, trials, k, C, alpha, seed, device) -> tuple[int | None, list[dict]]:
    """Walk the grid upwards and stop at the first |P| with mean p < alpha."""
    rows = []
    for n in sizes:
        rows += S.pvalue_curve(members, nonmembers, [n], trials=trials, k=k, C=C, seed=seed, alpha=alpha, progress=False, device=device)
        if rows and rows[-1]["mean_p"] < alpha:
            return n, rows
    return None, rows


class DatasetInference(Callback):
    def __init__(self, trials: int = 1000, alpha: float = 0.01, k: int = 5, C: float = 1.0,
                 sizes: list[int] | None = None, min_size: int = 5, gray_box: bool = True,
                 null_size: int | None = None, null_trials: int = 1000,
                 contamination_ratios: list[float] | None = None, contamination_sizes: list[int] | None = None,
                 contamination_trials: int = 1000, ablation: bool = True, ablation_trials: int | None = None,
                 existing_groups: list[str] | None = None, device: str = "cpu", seed: int = 0) -> None:
        self.trials, self.alpha, self.k, self.C, self.seed, self.device = trials, alpha, k, C, seed, device
        self.sizes, self.min_size, self.gray_box = sizes, min_size, gray_box
        self.null_size, self.null_trials = null_size, null_trials
        self.contamination_ratios = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0] if contamination_ratios is None else contamination_ratios
        self.contamination_sizes, self.contamination_trials = contamination_sizes, contamination_trials
        self.ablation, self.ablation_trials = ablation, ablation_trials or trials
        # Feature groups from prior work; the ablation adds every other group to them.
        self.existing_groups = ["dl", "secmi", "pia", "pian"] if existing_groups is None else existing_groups

    # ------------------------------------------------------------------ main

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = run_dir(trainer) / "cdi"
        res = getattr(pl_module, "results", None)
        if res is None or not trainer.is_global_zero:
            return
        summary, tables = self.run(res)
        self.save(folder, summary, tables)
        for name in ("curve", "contamination", "ablation"):
            if name in tables:
                log_table(trainer, f"cdi_{name}", tables[name])
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"cdi/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float)) and v is not None})
        self.report(summary, tables)
        self.plot(trainer, summary, tables)

    def run(self, res: dict) -> tuple[dict, dict]:
        names, F = list(res["names"]), res["features"].double()
        y = res["is_member"].bool()
        members, nonmembers = F[y], F[~y]
        if len(members) < 2 * self.k or len(nonmembers) < 2 * self.k:
            raise ValueError(f"dataset inference needs at least {2 * self.k} members and non-members; got {len(members)} and {len(nonmembers)}.")
        access = res.get("access") or {}
        gray_cols = [j for j, n in enumerate(names) if access.get(n, "gray") == "gray"]
        cap = min(len(members), len(nonmembers))
        sizes = sorted(n for n in (self.sizes or S.default_size_grid(cap)) if self.min_size <= n <= cap)
        summary: dict = {"n_members": len(members), "n_nonmembers": len(nonmembers), "n_features": len(names), "alpha": self.alpha, "trials": self.trials}
        tables: dict = {}

        # The audit exactly as the datamodule configured P and U (one data owner's case).
        role = res["in_suspect"].bool()
        sP, sU = S.cross_fit_scores(F[role].numpy(), F[~role].numpy(), k=self.k, seed=self.seed)
        summary["audit_n_p"], summary["audit_n_u"] = int(role.sum()), int((~role).sum())
        summary["audit_p_value"] = float(S.welch_t_test(torch.from_numpy(sP), torch.from_numpy(sU))[2])

        curves = {"all": S.pvalue_curve(members, nonmembers, sizes, self.trials, self.k, C=self.C, seed=self.seed, alpha=self.alpha, device=self.device)}
        if self.gray_box and 0 < len(gray_cols) < len(names):
            curves["gray"] = S.pvalue_curve(members[:, gray_cols], nonmembers[:, gray_cols], sizes, self.trials, self.k, C=self.C, seed=self.seed, alpha=self.alpha, device=self.device)
        tables["curve"] = [{"access": a, **r} for a, rows in curves.items() for r in rows]
        for a, rows in curves.items():
            summary[f"min_P_{a}"] = S.min_suspect_size(rows, self.alpha)

        # Null experiment: P and U both non-members.
        null_n = self.null_size or min(max(sizes), len(nonmembers) // 2)
        null = S.null_experiment(nonmembers, null_n, self.null_trials, self.k, self.alpha, self.C, self.seed + 1, self.device)
        summary.update({"null_n_p": null_n, "null_trials": self.null_trials, "null_mean_p": null["mean_p"],
                        "null_false_positive_rate": null["false_positive_rate"]})
        tables["null_p_values"] = null["p_values"]

        # p-value -> TPR@FPR=alpha at min |P| (App. C.17 and the empirical ROC of 1 - p).
        n_conv = summary["min_P_all"]
        if n_conv is not None and 2 * n_conv <= len(nonmembers):
            member_row = next(r for r in curves["all"] if r["n_p"] == n_conv)
            null_conv = S.null_experiment(nonmembers, n_conv, self.trials, self.k, self.alpha, self.C, self.seed + 2, self.device)
            summary["conversion_n_p"] = n_conv
            summary["tpr_at_alpha_empirical"] = S.pvalue_to_tpr(member_row["p_values"], null_conv["p_values"], self.alpha)
            summary["tpr_at_alpha_power"] = member_row["power_tpr"]

        # Contamination: P holds a fraction r of non-members.
        csizes = self.contamination_sizes or sorted({n for n in (n_conv, 2 * (n_conv or 0), max(sizes)) if n})
        rows = []
        grid = [(r, n) for r in self.contamination_ratios for n in csizes]
        for r, n in tqdm(grid, desc="CDI contamination", leave=False):
            rows += S.pvalue_curve(members, nonmembers, [n], self.contamination_trials, self.k, contamination=r, C=self.C, seed=self.seed, alpha=self.alpha, progress=False, device=self.device)
        tables["contamination"] = rows

        if self.ablation:
            tables["ablation"] = self._ablation(names, members, nonmembers, sizes, gray_cols)
            for row in tables["ablation"]:
                summary[f"min_P[{row['features']}]"] = row["min_P"]
        return summary, tables

    def _ablation(self, names, members, nonmembers, sizes, gray_cols) -> list[dict]:
        groups = list(dict.fromkeys(_group(n) for n in names))
        existing = [g for g in groups if g in self.existing_groups]
        new = [g for g in groups if g not in self.existing_groups]
        sets = []
        if existing:
            sets.append(("existing", existing))
        sets += [(g, [g]) for g in new]
        if existing:
            sets += [(f"existing+{g}", existing + [g]) for g in new]
        sets.append(("all", groups))
        if 0 < len(gray_cols) < len(names):
            sets.append(("all_gray_box", None))
        out = []
        for label, gs in tqdm(sets, desc="CDI feature ablation", leave=False):
            cols = gray_cols if gs is None else [j for j, n in enumerate(names) if _group(n) in gs]
            n, rows = _search_min_size(members[:, cols], nonmembers[:, cols], sizes, self.ablation_trials, self.k, self.C, self.alpha, self.seed, self.device)
            out.append({"features": label, "n_features": len(cols), "min_P": n, "mean_p_at_min_P": rows[-1]["mean_p"] if n else None,
                        "largest_P_tried": rows[-1]["n_p"] if rows else None, "mean_p_at_largest": rows[-1]["mean_p"] if rows else None})
        return out

    # ------------------------------------------------------------------ outputs

    def save(self, folder: Path, summary: dict, tables: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
        cols = ["access", "n_p", "n_u", "mean_p", "ci_low", "ci_high", "q025", "q975", "reject_rate", "power_tpr"]
        self._csv(folder / "pvalue_curve.csv", tables["curve"], cols)
        self._csv(folder / "contamination.csv", tables["contamination"], ["contamination", "n_p", "n_u", "mean_p", "ci_low", "ci_high", "reject_rate"])
        if "ablation" in tables:
            self._csv(folder / "ablation.csv", tables["ablation"], list(tables["ablation"][0]))
        torch.save({"curve": {f"{r['access']}_{r['n_p']}": r["p_values"] for r in tables["curve"]},
                    "null": tables["null_p_values"]}, folder / "p_values.pt")

    @staticmethod
    def _csv(path: Path, rows: list[dict], cols: list[str]) -> None:
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            for r in rows:
                w.writerow([f"{r[c]:.6g}" if isinstance(r[c], float) else r[c] for c in cols])

    def report(self, summary: dict, tables: dict) -> None:
        print(f"\nCDI: {summary['n_members']} members, {summary['n_nonmembers']} non-members, {summary['n_features']} features, {self.trials} trials per |P|")
        print(f"configured audit |P|={summary['audit_n_p']} |U|={summary['audit_n_u']}: p = {summary['audit_p_value']:.3g}")
        print(f"{'access':<7}{'|P|':>6}{'mean p':>11}{'95% CI':>24}{'reject':>8}{'power':>8}")
        for r in tables["curve"]:
            print(f"{r['access']:<7}{r['n_p']:>6}{r['mean_p']:>11.3g}   [{r['ci_low']:>9.3g}, {r['ci_high']:>9.3g}]{r['reject_rate']:>8.3f}{r['power_tpr']:>8.3f}")
        for a in ("all", "gray"):
            if f"min_P_{a}" in summary:
                print(f"min |P| ({a} features) with mean p < {self.alpha}: {summary[f'min_P_{a}']}")
        print(f"null experiment |P|=|U|={summary['null_n_p']}, {summary['null_trials']} trials: mean p = {summary['null_mean_p']:.3f}, "
              f"false-positive rate at alpha={self.alpha}: {100 * summary['null_false_positive_rate']:.2f}%")
        if "conversion_n_p" in summary:
            print(f"TPR@FPR={100 * self.alpha:g}% at |P|={summary['conversion_n_p']}: empirical {summary['tpr_at_alpha_empirical']:.3f}, power conversion {summary['tpr_at_alpha_power']:.3f}")
        print("contamination (fraction of non-members in P):")
        for r in tables["contamination"]:
            print(f"  r={r['contamination']:.2f} |P|={r['n_p']:>5}: mean p = {r['mean_p']:.3g}")
        if "ablation" in tables:
            print("feature-set ablation (min |P|):")
            for r in tables["ablation"]:
                tail = "" if r["min_P"] else f"  (not reached; mean p {r['mean_p_at_largest']:.3g} at |P|={r['largest_P_tried']})"
                print(f"  {r['features']:<22}{r['n_features']:>4} features  min |P| = {r['min_P']}{tail}")

    def plot(self, trainer: Trainer, summary: dict, tables: dict) -> None:

        fig, ax = plt.subplots(figsize=(5, 4))
        for a in dict.fromkeys(r["access"] for r in tables["curve"]):
            rows = [r for r in tables["curve"] if r["access"] == a]
            n = np.array([r["n_p"] for r in rows])
            m = np.array([r["mean_p"] for r in rows])
            lo = np.clip([r["ci_low"] for r in rows], 1e-300, 1)
            hi = np.clip([r["ci_high"] for r in rows], 1e-300, 1)
            ax.plot(n, np.clip(m, 1e-300, 1), marker="o", ms=3, label=f"{a} features (min |P| {summary.get(f'min_P_{a}')})")
            ax.fill_between(n, lo, hi, alpha=0.25)
        ax.axhline(self.alpha, color="red", ls="--", lw=1, label=f"alpha = {self.alpha}")
        ax.set(xscale="log", yscale="log", xlabel="|P|", ylabel="mean p-value", title="CDI p-value vs suspect-set size")
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(trainer, fig, "cdi_pvalue_vs_size")

        fig, ax = plt.subplots(figsize=(5, 4))
        for n in sorted({r["n_p"] for r in tables["contamination"]}):
            rows = sorted((r for r in tables["contamination"] if r["n_p"] == n), key=lambda r: r["contamination"])
            ax.plot([r["contamination"] for r in rows], np.clip([r["mean_p"] for r in rows], 1e-300, 1), marker="o", ms=3, label=f"|P| = {n}")
        ax.axhline(self.alpha, color="red", ls="--", lw=1)
        ax.set(yscale="log", xlabel="fraction of non-members in P", ylabel="mean p-value", title="CDI under contamination")
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(trainer, fig, "cdi_contamination")
