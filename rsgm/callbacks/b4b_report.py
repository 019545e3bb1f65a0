"""Report of the B4B protocol (Table 6.4.1, Figs. 6.4.1-6.4.3) from ``pl_module.results``.

Needs ``results = {rows, fidelity, tasks, reference, traces, coverage_at, reference_config, kinds}``
as ``rsgm.lightning_modules.b4b_protocol.B4BProtocol`` leaves them.  Writes into the run folder
``b4b_table.csv`` / ``.txt``, ``b4b_coverage_at_equal_queries.csv``, ``b4b_remap_fidelity.csv``
and ``plots/`` (W&B gets the plots too), and prints the tables.
"""
from __future__ import annotations

import pandas as pd
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from rsgm.defenses.cost import b4b_sigma
from rsgm.utils.dashboard import log_table
from rsgm.utils.figures import plt, run_dir, save_figure

COLORS = {"legit": "tab:green", "attack": "tab:red", "sybil": "tab:orange"}


class B4BReportCallback(Callback):
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        res = getattr(pl_module, "results", None)
        if not res or not trainer.is_global_zero:
            return
        table = pd.DataFrame(res["rows"])
        table["mean"] = table[res["tasks"]].mean(axis=1)
        text = table.to_string(index=False, float_format=lambda v: f"{v:.3f}" if v < 1 else f"{v:.1f}")
        cov = res["coverage_at"]
        print("\nB4B protocol (Table 6.4.1 shape): linear-probe accuracy (%) per downstream task\n" + text + "\n")
        print(f"Coverage after the same number of queries (defence '{res['reference']}'):\n"
              + cov.to_string(index=False, float_format=lambda v: f"{v:.4f}") + "\n")
        out = run_dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "b4b_table.csv", index=False)
        cov.to_csv(out / "b4b_coverage_at_equal_queries.csv", index=False)
        (out / "b4b_table.txt").write_text(text + "\n")
        log_table(trainer, "b4b_table", table)
        log_table(trainer, "b4b_coverage_at_equal_queries", cov)
        if res["fidelity"]:
            pd.DataFrame(res["fidelity"]).to_csv(out / "b4b_remap_fidelity.csv", index=False)
            log_table(trainer, "b4b_remap_fidelity", res["fidelity"])
        self._plots(trainer, res)

    @staticmethod
    def _plots(trainer: Trainer, res: dict) -> None:
        kinds, traces, ref = res["kinds"], res["traces"], res["reference"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for user, tr in traces.items():
            q, c, _ = zip(*tr)
            ax.plot(q, c, label=user, color=COLORS[kinds[user]], alpha=0.85, ls="--" if kinds[user] == "sybil" else "-")
        ax.set(xlabel="queries of the account", ylabel="coverage (fraction of occupied buckets)", title="Coverage vs queries (Fig. 6.4.1)")
        ax.legend(fontsize=7)
        save_figure(trainer, fig, "b4b_coverage_vs_queries")

        cfg = res["reference_config"]
        fig, ax = plt.subplots(figsize=(6, 4))
        all_cov = [c for tr in traces.values() for _, c, _ in tr]
        if cfg.noise == "coverage":
            grid = torch.linspace(0, max(all_cov) * 1.2 + 1e-6, 200).tolist()
            ax.plot(grid, [b4b_sigma(min(g, 1.0), cfg.lam, cfg.alpha, cfg.beta) for g in grid], color="black", lw=1, label="eq. 6.1")
        for user, tr in traces.items():
            _, c, s = zip(*tr)
            ax.scatter(c, s, s=8, color=COLORS[kinds[user]], label=user)
        ax.set(xlabel="coverage", ylabel="sigma", yscale="symlog", title=f"sigma vs coverage, defence '{ref}' (Fig. 6.4.2)")
        ax.legend(fontsize=7)
        save_figure(trainer, fig, "b4b_sigma_vs_coverage")

        if res["fidelity"]:
            df = pd.DataFrame(res["fidelity"])
            fig, ax = plt.subplots(figsize=(6, 4))
            for keys, g in df.groupby([c for c in ("defense", "account") if c in df]):
                ax.plot(g["n_overlap"], g["cosine_distance"], marker="o", label=": ".join(map(str, keys if isinstance(keys, tuple) else (keys,))))
            ax.set(xscale="log", xlabel="overlapping queries", ylabel="mean cosine distance after remap", title="Remapping fidelity (Fig. 6.4.3)")
            ax.legend(fontsize=7)
            save_figure(trainer, fig, "b4b_remap_fidelity")
