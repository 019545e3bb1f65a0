"""Evaluation of the synthetic 2-D benchmark: Table 4.4.1's variance and W1 per spread."""

from __future__ import annotations

import numpy as np
from lightning.pytorch import LightningModule, Trainer

from rsgm.callbacks.evaluation import SplitEvaluation
from rsgm.metrics.gather import GatheredSamples
from rsgm.metrics.synthetic2d import synthetic2d_report
from rsgm.utils.figures import plt, save_figure


def scatter_figure(real: np.ndarray, fake: np.ndarray, spread: np.ndarray, title: str) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4), sharex=True, sharey=True)
    for s, ax in enumerate(axes):
        rows = spread == s
        ax.scatter(*real[rows].T, s=2, alpha=0.4, label="real")
        ax.scatter(*fake[rows].T, s=2, alpha=0.4, label="generated")
        ax.set_title(f"spread = {s}")
    axes[0].legend(markerscale=5)
    fig.suptitle(title)
    return fig


class Synthetic2DCallback(SplitEvaluation):
    """Logs ``{val,test}/var_spread{0,1}`` and ``/w1_spread{0,1}``; at test also writes
    ``test_synthetic2d.json`` and a scatter plot of real vs generated points."""

    test_file = "test_synthetic2d.json"

    def __init__(self, plot_every_n_epochs: int = 0) -> None:
        super().__init__(plot_every_n_epochs)
        self.samples: dict[str, GatheredSamples] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for split in ("val", "test"):
            self.samples[split] = GatheredSamples(["real", "fake", "label", "spread"]).to(pl_module.device)

    def update(self, split: str, outputs: dict) -> None:
        batch = outputs["batch"]
        self.samples[split].update(outputs["index"], real=outputs["real"], fake=outputs["fake"],
                                   label=batch["label"], spread=batch["spread"])

    def finish(self, split: str, trainer: Trainer, pl_module: LightningModule, plot: bool) -> dict[str, float]:
        s = self.samples[split].compute()
        self.samples[split].reset()
        scale = trainer.datamodule.hparams.scale
        real, fake = s["real"].cpu() * scale, s["fake"].cpu() * scale
        report = synthetic2d_report(real, fake, s["label"].cpu(), s["spread"].cpu())
        pl_module.log_dict({f"{split}/{k}": v for k, v in report.items()}, sync_dist=True)  # gathered: equal on every rank
        if plot:
            fig = scatter_figure(real.numpy(), fake.numpy(), s["spread"].cpu().numpy(), f"{split}, epoch {trainer.current_epoch}")
            save_figure(trainer, fig, f"{split}_points_epoch{trainer.current_epoch:03d}")
        return report
