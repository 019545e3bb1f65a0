"""Evaluation of the synthetic 2-D benchmark: Table 4.4.1's variance and W1 per spread."""

from __future__ import annotations

import json

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer

from rsgm.metrics.gather import GatheredSamples
from rsgm.metrics.synthetic2d import synthetic2d_report
from rsgm.utils.figures import plt, run_dir, save_figure


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


class Synthetic2DCallback(Callback):
    """Logs ``{val,test}/var_spread{0,1}`` and ``/w1_spread{0,1}``; at test also writes
    ``test_synthetic2d.json`` and a scatter plot of real vs generated points."""

    def __init__(self, plot_every_n_epochs: int = 0) -> None:
        self.plot_every_n_epochs = plot_every_n_epochs
        self.samples: dict[str, GatheredSamples] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for split in ("val", "test"):
            self.samples[split] = GatheredSamples(["real", "fake", "label", "spread"]).to(pl_module.device)

    def _update(self, split: str, outputs: dict) -> None:
        batch = outputs["batch"]
        self.samples[split].update(outputs["index"], real=outputs["real"], fake=outputs["fake"],
                                   label=batch["label"], spread=batch["spread"])

    def _finish(self, split: str, trainer: Trainer, pl_module: LightningModule, plot: bool) -> dict[str, float]:
        s = self.samples[split].compute()
        self.samples[split].reset()
        scale = trainer.datamodule.hparams.scale
        real, fake = s["real"].cpu() * scale, s["fake"].cpu() * scale
        report = synthetic2d_report(real, fake, s["label"].cpu(), s["spread"].cpu())
        pl_module.log_dict({f"{split}/{k}": v for k, v in report.items()})
        if plot:
            fig = scatter_figure(real.numpy(), fake.numpy(), s["spread"].cpu().numpy(), f"{split}, epoch {trainer.current_epoch}")
            save_figure(trainer, fig, f"{split}_points_epoch{trainer.current_epoch:03d}")
        return report

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._update("val", outputs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            every = self.plot_every_n_epochs
            self._finish("val", trainer, pl_module, plot=every > 0 and (trainer.current_epoch + 1) % every == 0)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("test", outputs)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        report = self._finish("test", trainer, pl_module, plot=True)
        if trainer.is_global_zero:
            (run_dir(trainer) / "test_synthetic2d.json").write_text(json.dumps(report, indent=2))
