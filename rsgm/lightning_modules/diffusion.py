"""A small class-conditional DDPM built from diffusers components: the built-in audit target.

Training minimises the denoising loss of methods_spec §0.3,
L = || eps - f_theta(sqrt(abar_t) x + sqrt(1 - abar_t) eps, t, y) ||^2 with t ~ U{0..T-1},
and drops the class to the null class with probability ``cond_drop_prob`` (classifier-free
guidance training, as the ImageNet DMs in the thesis were trained).

At the end of ``fit`` the model is exported as a diffusers folder (``unet/``,
``scheduler/``) plus ``membership.json`` (the member / non-member indices), so the audit
config loads it through :class:`rsgm.components.diffusion_adapters.PixelUNetTarget`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch import LightningModule

from rsgm.components.diffusion_adapters import class_conditional_unet


class ClassConditionalDiffusion(LightningModule):
    def __init__(self, image_size: int = 8, channels: int = 1, num_classes: int = 10,
                 block_out_channels: tuple[int, ...] = (32, 64), layers_per_block: int = 1,
                 num_train_timesteps: int = 1000, beta_schedule: str = "linear", cond_drop_prob: float = 0.1,
                 add_attention: bool = False, lr: float = 1e-3, export_dir: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        from diffusers import DDPMScheduler

        self.unet = class_conditional_unet(image_size, channels, num_classes, block_out_channels, layers_per_block, add_attention)
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone().float())

    def training_step(self, batch, batch_idx):
        x, y = batch["x"], batch["cond"]
        t = torch.randint(0, self.hparams.num_train_timesteps, (x.shape[0],), device=x.device)
        drop = torch.rand(x.shape[0], device=x.device) < self.hparams.cond_drop_prob
        y = torch.where(drop, torch.full_like(y, self.hparams.num_classes), y)
        eps = torch.randn_like(x)
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        pred = self.unet(ab.sqrt() * x + (1 - ab).sqrt() * eps, t, class_labels=y).sample
        loss = (pred - eps).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.unet.parameters(), lr=self.hparams.lr, weight_decay=0.0)

    def on_train_end(self) -> None:
        if not self.hparams.export_dir or not self.trainer.is_global_zero:
            return
        out = Path(self.hparams.export_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(out / "unet")
        self.scheduler.save_pretrained(out / "scheduler")
        split = getattr(self.trainer.datamodule, "split", None)
        if split is not None:
            (out / "membership.json").write_text(json.dumps(split))
