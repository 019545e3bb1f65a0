"""Training the built-in image autoregressive models (:mod:`rsgm.components.iar`).

``rsgm fit --config configs/iar_digits.yaml`` (raster), ``var_digits.yaml`` (next-scale) or
``mar_digits.yaml`` (masked + diffusion head). The component computes its own training loss
with class dropout (CFG training); this module only optimises it, saves a sample grid per
class at the end of every ``grid_every`` epochs, and exports the model at the end of ``fit``
as ``<export_dir>/model.safetensors`` + ``config.json`` + ``membership.json`` (the member /
non-member digit indices), which :class:`rsgm.components.iar_adapters.BuiltinIARTarget` loads.
"""

from __future__ import annotations


import torch
from lightning.pytorch import LightningModule
from torch import nn

from rsgm.utils.figures import plt, save_figure


def sample_grid(model: nn.Module, rows: int = 10, per_class: int = 8, seed: int = 0) -> torch.Tensor:
    """(rows * per_class, 1, H, W) samples drawn with a fixed seed; row r shows class
    r * (K // rows) of the model's K classes (K = 10 digits: row r is digit r; with the fine
    labels of ``iar_digits_fine.yaml``, the largest cluster of digit r)."""
    g = torch.Generator().manual_seed(seed)
    step = max(getattr(model, "num_classes", rows) // rows, 1)
    cond = (torch.arange(rows) * step).repeat_interleave(per_class)
    was = model.training
    model.eval()
    x = model.sample(cond, generator=g)
    model.train(was)
    return x.clamp(-1, 1)


def grid_figure(images: torch.Tensor, rows: int, title: str = ""):
    cols = images.shape[0] // rows
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.6, rows * 0.6))
    for ax, im in zip(axes.flat, images):
        ax.imshow(im[0].numpy(), cmap="gray_r", vmin=-1, vmax=1)
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    return fig


class IARTraining(LightningModule):
    """Args:
        model: a built-in IAR component (class_path + init_args in the config).
        lr: AdamW learning rate.
        export_dir: folder for the exported model (null: no export).
        grid_every: save a sample grid every this many epochs (and at the end).
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, export_dir: str | None = None, grid_every: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model

    def training_step(self, batch, batch_idx):
        loss = self.model.loss(batch["x"], batch["cond"], train=True)
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, weight_decay=0.0)

    def _save_grid(self, name: str) -> None:
        x = sample_grid(self.model.cpu() if self.device.type == "cpu" else self.model)
        save_figure(self.trainer, grid_figure(x.cpu(), 10, f"{type(self.model).__name__} samples, epoch {self.current_epoch + 1}"), name)

    def on_train_epoch_end(self) -> None:
        every = self.hparams.grid_every
        if every and (self.current_epoch + 1) % every == 0 and self.trainer.is_global_zero:
            self._save_grid(f"samples_epoch{self.current_epoch + 1}")

    def on_train_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        self._save_grid("samples")
        if self.hparams.export_dir:
            from rsgm.components.iar_adapters import export_builtin

            split = getattr(self.trainer.datamodule, "split", None)
            export_builtin(self.model, self.hparams.export_dir, split)
