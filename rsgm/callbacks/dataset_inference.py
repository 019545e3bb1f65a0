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
* the feature-set ablation (Fig. 8.5.2): min |P| per feature subset; ``ablation_sets``
  chooses them (singles, pairs, triples, single existing features, explicit ``a+b``;
  :func:`rsgm.privacy.cdi_extras.ablation_sets`);
* optional studies of App. C (each off unless configured; ``configs/cdi_digits_studies.yaml``):
  ``u_ratios``: min |P| under |U| = ratio x |P| (Table C.12.1); ``set_level_sizes``: the
  set-level max-score MIA against CDI's TPR@FPR (Table 8.5.1); ``roc_sizes``: CDI's ROC
  over an alpha sweep (App. C.18) beside each existing MIA applied to the DI task with the
  max rule (App. C.19).

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

from rsgm.errors import RSGMError
from rsgm.privacy import cdi_extras as X
from rsgm.privacy import stats as S
from rsgm.utils.dashboard import log_table
from rsgm.privacy.safe_files import save_tensors
from rsgm.utils.figures import plt, run_dir, save_figure

PVALUES_KIND = "rsgm.cdi_pvalues"  # read back with rsgm.privacy.safe_files.load_tensors(path, PVALUES_KIND)


class DatasetInference(Callback):
    def __init__(self, trials: int = 1000, alpha: float = 0.01, k: int = 5, C: float = 1.0,
                 sizes: list[int] | None = None, min_size: int = 5, gray_box: bool = True,
                 null_size: int | None = None, null_trials: int = 1000,
                 contamination_ratios: list[float] | None = None, contamination_sizes: list[int] | None = None,
                 contamination_trials: int = 1000, ablation: bool = True, ablation_trials: int | None = None,
                 existing_groups: list[str] | None = None, device: str = "cpu", seed: int = 0,
                 procedure: str = S.DEFAULT_PROCEDURE, permutations: int = 0, ablation_sets: list[str] | None = None,
                 u_ratios: list[float] | None = None, set_level_sizes: list[int] | None = None, roc_sizes: list[int] | None = None,
                 study_sets: int = 1000, mia_di_features: list[str] | None = None) -> None:
        S.make_procedure(procedure, k)  # unknown names fail at construction, in one line
        least = {"trials": (trials, 1), "null_trials": (null_trials, 1), "contamination_trials": (contamination_trials, 1),
                 "ablation_trials": (ablation_trials or 1, 1), "study_sets": (study_sets, 1), "min_size": (min_size, 1),
                 "k": (k, 2), "permutations": (permutations, 0)}
        for name, (value, low) in least.items():
            if value < low:
                raise RSGMError(f"DatasetInference.{name} must be at least {low}, got {value}.")
        if not 0 < alpha < 1 or not C > 0:
            raise RSGMError(f"DatasetInference needs 0 < alpha < 1 and C > 0, got alpha={alpha}, C={C}.")
        bad = [r for r in (contamination_ratios or []) if not 0 <= r <= 1] + [v for v in (sizes or []) + (u_ratios or []) if not v > 0]
        if bad:
            raise RSGMError(f"DatasetInference: contamination_ratios must lie in [0, 1] and sizes, u_ratios be positive; got {bad}.")
        self.trials, self.alpha, self.k, self.C, self.seed, self.device = trials, alpha, k, C, seed, device
        self.procedure, self.permutations = procedure, permutations
        self.sizes, self.min_size, self.gray_box = sizes, min_size, gray_box
        self.null_size, self.null_trials = null_size, null_trials
        self.contamination_ratios = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0] if contamination_ratios is None else contamination_ratios
        self.contamination_sizes, self.contamination_trials = contamination_sizes, contamination_trials
        self.ablation, self.ablation_trials = ablation, ablation_trials or trials
        # Feature groups from prior work; the ablation adds every other group to them.
        self.existing_groups = list(X.EXISTING_GROUPS) if existing_groups is None else existing_groups
        self.ablation_sets = ablation_sets
        self.u_ratios, self.set_level_sizes, self.roc_sizes = u_ratios or [], set_level_sizes or [], roc_sizes or []
        self.study_sets, self.mia_di_features = study_sets, mia_di_features

    # ------------------------------------------------------------------ main

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = run_dir(trainer) / "cdi"
        res = getattr(pl_module, "results", None)
        if res is None or not trainer.is_global_zero:
            return
        summary, tables = self.run(res)
        self.save(folder, summary, tables)
        for name in ("curve", "contamination", "ablation", "imbalance", "set_level", "di_roc"):
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

        # The audit exactly as the datamodule configured P and U (one data owner's case), and
        # its calibration: the same test on P', U' drawn from the user's own reference set U.
        role = res["in_suspect"].bool()
        FP, FU = F[role], F[~role]
        audit = S.audit_test(FP, FU, self.procedure, self.k, self.C, self.seed, self.permutations, self.device)
        summary.update({"procedure": self.procedure, "audit_n_p": len(FP), "audit_n_u": len(FU), "audit_p_value": audit["p"]})
        if "p_permutation" in audit:
            summary.update({"audit_p_permutation": audit["p_permutation"], "permutations": self.permutations})
        # P' as large as the audit's P (at most half of U); U' the rest of U.
        null_p = min(self.null_size or len(FP), len(FU) // 2)
        null_u = len(FU) - null_p
        null = S.null_experiment(FU, null_p, self.null_trials, self.k, self.alpha, self.C, self.seed + 1, self.device,
                                 self.procedure, n_u=null_u, progress=True)
        check = S.null_check(null["p_values"], self.alpha)
        p_audit = summary.get("audit_p_permutation", audit["p"])
        summary.update({"null_n_p": null_p, "null_n_u": null_u, "null_trials": self.null_trials, "null_mean_p": null["mean_p"],
                        "null_false_positive_rate": check["false_positive_rate"], "null_allowed_false_positives": check["upper_allowed"],
                        "null_ks_pvalue": check["ks_pvalue"], "null_check_passed": check["passed"],
                        "audit_significant": bool(check["passed"] and p_audit < self.alpha)})
        tables["null_p_values"] = null["p_values"]

        kw = dict(C=self.C, seed=self.seed, alpha=self.alpha, device=self.device, procedure=self.procedure)
        curves = {"all": S.pvalue_curve(members, nonmembers, sizes, self.trials, self.k, **kw)}
        if self.gray_box and 0 < len(gray_cols) < len(names):
            curves["gray"] = S.pvalue_curve(members[:, gray_cols], nonmembers[:, gray_cols], sizes, self.trials, self.k, **kw)
        tables["curve"] = [{"access": a, **r} for a, rows in curves.items() for r in rows]
        for a, rows in curves.items():
            summary[f"min_P_{a}"] = S.min_suspect_size(rows, self.alpha)

        # p-value -> TPR@FPR=alpha at min |P| (App. C.17 and the empirical ROC of 1 - p).
        n_conv = summary["min_P_all"]
        if n_conv is not None and 2 * n_conv <= len(nonmembers):
            member_row = next(r for r in curves["all"] if r["n_p"] == n_conv)
            null_conv = S.null_experiment(nonmembers, n_conv, self.trials, self.k, self.alpha, self.C, self.seed + 2, self.device, self.procedure)
            summary["conversion_n_p"] = n_conv
            summary["tpr_at_alpha_empirical"] = S.pvalue_to_tpr(member_row["p_values"], null_conv["p_values"], self.alpha)
            summary["tpr_at_alpha_power"] = member_row["power_tpr"]

        # Contamination: P holds a fraction r of non-members.
        csizes = self.contamination_sizes or sorted({n for n in (n_conv, 2 * (n_conv or 0), max(sizes)) if n})
        rows = []
        grid = [(r, n) for r in self.contamination_ratios for n in csizes]
        for r, n in tqdm(grid, desc="CDI contamination", leave=False):
            rows += S.pvalue_curve(members, nonmembers, [n], self.contamination_trials, self.k, contamination=r, progress=False, **kw)
        tables["contamination"] = rows

        if self.ablation:
            tables["ablation"] = self._ablation(names, members, nonmembers, sizes, access)
            for row in tables["ablation"]:
                summary[f"min_P[{row['features']}]"] = row["min_P"]
        if self.u_ratios:
            tables["imbalance"] = X.imbalance_study(members, nonmembers, self.u_ratios, sizes, self.trials, self.k, self.C, self.alpha,
                                                    self.seed, self.device, self.procedure)
            for row in tables["imbalance"]:
                summary[f"min_P[U/P={row['u_ratio']:g}]"] = row["min_P"]
        if self.set_level_sizes or self.roc_sizes:
            self._set_studies(names, members, nonmembers, summary, tables)
        return summary, tables

    def _cdi_at(self, members, nonmembers, n: int) -> tuple[dict, torch.Tensor] | None:
        """Member-trial curve row and null p-values at |P| = |U| = n (None if the pools are too small)."""
        if n > len(members) or 2 * n > len(nonmembers):
            return None
        kw = dict(C=self.C, seed=self.seed, alpha=self.alpha, device=self.device, procedure=self.procedure)
        rows = S.pvalue_curve(members, nonmembers, [n], self.trials, self.k, progress=False, **kw)
        null = S.null_experiment(nonmembers, n, self.trials, self.k, self.alpha, self.C, self.seed + 2, self.device, self.procedure)
        return (rows[0], null["p_values"]) if rows else None

    def _set_studies(self, names, members, nonmembers, summary: dict, tables: dict) -> None:
        """Table 8.5.1 (set-level max-score MIA vs CDI) and App. C.18/C.19 (ROC over alpha vs
        single MIAs on the DI task)."""
        sP, sU = X.crossfit_scores(members, nonmembers, self.k, self.seed)
        tables["set_level"], tables["di_roc"], tables["alpha_roc"] = [], [], []
        for n in tqdm(sorted(set(self.set_level_sizes) | set(self.roc_sizes)), desc="CDI set-level studies", leave=False):
            cdi = self._cdi_at(members, nonmembers, n)
            if cdi is None:
                continue
            row, p_null = cdi
            tpr_emp = S.pvalue_to_tpr(row["p_values"], p_null, self.alpha)
            if n in self.set_level_sizes:
                mia = X.set_level_mia(sP, sU, n, self.study_sets, self.alpha, self.seed + n)
                tables["set_level"].append({"n_p": n, "set_level_tpr": mia["tpr_at_fpr"], "set_level_auc": mia["auc"],
                                            "set_level_calibrated_tpr": mia["calibrated_tpr"], "set_level_calibrated_fpr": mia["calibrated_fpr"],
                                            "cdi_tpr_power": row["power_tpr"], "cdi_tpr_empirical": tpr_emp, "cdi_mean_p": row["mean_p"]})
            if n in self.roc_sizes:
                fpr, tpr = X.pvalue_roc(row["p_values"], p_null)
                tables["di_roc"].append({"method": "cdi", "set_size": n, "tpr_at_fpr": tpr_emp, "auc": float(torch.trapezoid(tpr, fpr))})
                tables["alpha_roc"] += [{"set_size": n, **r} for r in X.cdi_alpha_roc(row["p_values"], p_null)]
                tables["di_roc"] += [{"method": r["method"], "set_size": n, "tpr_at_fpr": r["tpr_at_fpr"], "auc": r["auc"]}
                                     for r in X.mia_on_di(names, members, nonmembers, [n], self.study_sets, self.alpha, self.seed, self.mia_di_features)]
        for r in tables["set_level"]:
            summary[f"set_level_tpr[{r['n_p']}]"] = r["set_level_tpr"]
            summary[f"cdi_tpr_power[{r['n_p']}]"] = r["cdi_tpr_power"]

    def _ablation(self, names, members, nonmembers, sizes, access) -> list[dict]:
        sets = X.ablation_sets(names, self.ablation_sets, self.existing_groups, access or {n: "gray" for n in names})
        out = []
        for label, cols in tqdm(sets, desc="CDI feature ablation", leave=False):
            n, rows = X.search_min_size(members[:, cols], nonmembers[:, cols], sizes, self.ablation_trials, self.k, self.C, self.alpha, self.seed, self.device, self.procedure)
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
        for name in ("ablation", "imbalance", "set_level", "di_roc", "alpha_roc"):
            if tables.get(name):
                self._csv(folder / f"{name}.csv", tables[name], list(tables[name][0]))
        save_tensors(folder / "p_values.safetensors", PVALUES_KIND,
                     {f"curve/{r['access']}_{r['n_p']}": r["p_values"] for r in tables["curve"]} | {"null": tables["null_p_values"]},
                     {"procedure": self.procedure, "alpha": self.alpha})

    @staticmethod
    def _csv(path: Path, rows: list[dict], cols: list[str]) -> None:
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            for r in rows:
                w.writerow([f"{r[c]:.6g}" if isinstance(r[c], float) else r[c] for c in cols])

    def report(self, summary: dict, tables: dict) -> None:
        print(f"\nCDI: {summary['n_members']} members, {summary['n_nonmembers']} non-members, {summary['n_features']} features, {self.trials} trials per |P|")
        print(self.audit_lines(summary))
        print(f"{'access':<7}{'|P|':>6}{'mean p':>11}{'95% CI':>24}{'reject':>8}{'power':>8}")
        for r in tables["curve"]:
            print(f"{r['access']:<7}{r['n_p']:>6}{r['mean_p']:>11.3g}   [{r['ci_low']:>9.3g}, {r['ci_high']:>9.3g}]{r['reject_rate']:>8.3f}{r['power_tpr']:>8.3f}")
        for a in ("all", "gray"):
            if f"min_P_{a}" in summary:
                print(f"min |P| ({a} features) with mean p < {self.alpha}: {summary[f'min_P_{a}']}")
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
        for r in tables.get("imbalance", []):
            print(f"|U|/|P| = {r['u_ratio']:g}: min |P| = {r['min_P']}")
        for r in tables.get("set_level", []):
            print(f"|P|={r['n_p']}: TPR@FPR={100 * self.alpha:g}%: set-level max-score MIA {r['set_level_tpr']:.3f} "
                  f"(calibrated threshold: TPR {r['set_level_calibrated_tpr']}, FPR {r['set_level_calibrated_fpr']}); "
                  f"CDI {r['cdi_tpr_power']:.3f} (power) / {r['cdi_tpr_empirical']:.3f} (empirical)")
        for r in tables.get("di_roc", []):
            print(f"DI task |P|={r['set_size']}: {r['method']:<8} TPR@FPR={100 * self.alpha:g}% {r['tpr_at_fpr']:.3f}  AUC {r['auc']:.3f}")

    def audit_lines(self, summary: dict) -> str:
        """The audit verdict with its calibration, as printed at test end."""
        proc = S.make_procedure(self.procedure, self.k)
        label = " (the thesis' original procedure; not calibrated, for reproduction only)" if proc.name == "crossfit" else ""
        lines = [f"CDI procedure: {proc.name}: {proc.description}{label}",
                 f"configured audit |P|={summary['audit_n_p']} |U|={summary['audit_n_u']}: p = {summary['audit_p_value']:.3g}"
                 + (f", exact permutation p = {summary['audit_p_permutation']:.3g} ({summary['permutations']} permutations)" if "audit_p_permutation" in summary else ""),
                 f"null check on the reference set (|P'|={summary['null_n_p']}, |U'|={summary['null_n_u']}, {summary['null_trials']} trials): "
                 f"false-positive rate at alpha={self.alpha}: {100 * summary['null_false_positive_rate']:.2f}% "
                 f"(at most {summary['null_allowed_false_positives']} of {summary['null_trials']} allowed), mean p {summary['null_mean_p']:.3f}"]
        if not summary["null_check_passed"]:
            lines.append("CDI: the null check failed (too many false positives on the reference data); no result is called significant.")
        else:
            verdict = "significant: P was used to train the model" if summary["audit_significant"] else "not significant"
            lines.append(f"CDI verdict at alpha={self.alpha}: {verdict}")
        return "\n".join(lines)

    def plot(self, trainer: Trainer, summary: dict, tables: dict) -> None:
        self.plot_null_qq(trainer, tables["null_p_values"], summary)

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

        if not tables["contamination"]:
            return
        fig, ax = plt.subplots(figsize=(5, 4))
        for n in sorted({r["n_p"] for r in tables["contamination"]}):
            rows = sorted((r for r in tables["contamination"] if r["n_p"] == n), key=lambda r: r["contamination"])
            ax.plot([r["contamination"] for r in rows], np.clip([r["mean_p"] for r in rows], 1e-300, 1), marker="o", ms=3, label=f"|P| = {n}")
        ax.axhline(self.alpha, color="red", ls="--", lw=1)
        ax.set(yscale="log", xlabel="fraction of non-members in P", ylabel="mean p-value", title="CDI under contamination")
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(trainer, fig, "cdi_contamination")

    def plot_null_qq(self, trainer: Trainer, p_null: torch.Tensor, summary: dict) -> None:
        """Null p-values against the uniform (log-log QQ plot with a pointwise 95 % band)."""
        from scipy import stats as sps

        p = np.sort(p_null.double().numpy())
        n = len(p)
        i = np.arange(1, n + 1)
        expected = i / (n + 1)
        lo, hi = sps.beta.ppf(0.025, i, n + 1 - i), sps.beta.ppf(0.975, i, n + 1 - i)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.fill_between(expected, lo, hi, color="grey", alpha=0.3, label="95 % band (uniform)")
        ax.plot(expected, np.clip(p, 1e-300, 1), ".", ms=2, label=f"null p-values ({n} trials)")
        ax.plot([1 / (n + 1), 1], [1 / (n + 1), 1], "k:", lw=0.8)
        ax.axvline(self.alpha, color="red", ls="--", lw=0.8)
        ok = "passed" if summary["null_check_passed"] else "FAILED"
        ax.set(xscale="log", yscale="log", xlabel="uniform quantile", ylabel="null p-value",
               title=f"CDI null check ({self.procedure}): FPR {100 * summary['null_false_positive_rate']:.1f}% at alpha {self.alpha}, {ok}")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(trainer, fig, "cdi_null_qq")
