"""Linear-probe evaluation of a (stolen) encoder on the B4B downstream tasks."""
from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from rsgm.defenses.stealing import embed, linear_probe_accuracy
from rsgm.utils.dashboard import log_table


class LinearProbeCallback(Callback):
    """After the last training epoch (and every ``every_n_epochs`` epochs if > 0), train a logistic-regression
    probe on ``pl_module.<attribute>`` features for every task of the datamodule and log
    ``probe/<task>`` (accuracy, %).  Also plots the module's remapping-fidelity curve when it
    has one (Fig. 6.4.3).
    """

    def __init__(self, attribute: str = "surrogate", every_n_epochs: int = 0):
        self.attribute, self.every_n_epochs = attribute, every_n_epochs

    def _probe(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        model = getattr(pl_module, self.attribute)
        tasks = trainer.datamodule.tasks
        with torch.no_grad():
            acc = {t: linear_probe_accuracy(embed(model, task.x_train), task.y_train, embed(model, task.x_test), task.y_test)
                   for t, task in tasks.items()}
        model.train()
        for t, a in acc.items():
            pl_module.log(f"probe/{t}", a, rank_zero_only=True)
        return acc

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        last = trainer.current_epoch + 1 >= (trainer.max_epochs or 0) or trainer.should_stop
        if last or (self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0):
            self.last_accuracy = self._probe(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning forbids self.log here, so the last epoch's probe is reported, not re-run
        acc = getattr(self, "last_accuracy", None)
        if acc is None or not trainer.is_global_zero:
            return
        line = ", ".join(f"{t} {a:.1f}" for t, a in acc.items())
        print(f"\nstolen encoder linear-probe accuracy (%): {line}")
        out = Path(trainer.log_dir or trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        log_table(trainer, "probe_accuracy", [{"task": t, "accuracy": a} for t, a in acc.items()])
        (out / "probe_accuracy.csv").write_text("task,accuracy\n" + "".join(f"{t},{a:.3f}\n" for t, a in acc.items()))
        fid = getattr(pl_module, "remap_fidelity", [])
        if fid:
            import matplotlib.pyplot as plt
            import pandas as pd

            from rsgm.utils.figures import save_figure

            df = pd.DataFrame(fid)
            df.to_csv(out / "remap_fidelity.csv", index=False)
            log_table(trainer, "remap_fidelity", df)
            fig, ax = plt.subplots(figsize=(6, 4))
            for acc_name, g in df.groupby("account"):
                ax.plot(g["n_overlap"], g["cosine_distance"], marker="o", label=acc_name)
            ax.set(xscale="log", xlabel="overlapping queries", ylabel="mean cosine distance after remap", title="Remapping fidelity (Fig. 6.4.3)")
            ax.legend()
            save_figure(trainer, fig, "remap_fidelity")
