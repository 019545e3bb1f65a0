"""B4B victim and defended encoder as LightningModules.

* ``VictimEncoderModule`` trains the testbed victim (supervised, see docs/b4b.md) and exports
  the encoder's state dict to ``export_path``.
* ``B4BEncoder`` wraps any encoder with the B4B defence; ``predict`` / ``test`` batches carry
  ``user_id`` and only defended representations leave the module.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from rsgm.components.encoders import load_encoder_weights
from rsgm.defenses.b4b import B4BDefense, load_or_create_secret
from rsgm.defenses.config import DefenseConfig


class VictimEncoderModule(LightningModule):
    """Supervised training of an encoder with a linear head over the broad corpus' labels.

    Small Gaussian input noise regularises; the head sees the signed representation, so the
    representation itself spreads over all orthants (what the LSH coverage needs).
    """

    def __init__(self, encoder: nn.Module, n_classes: int = 24, lr: float = 2e-3, weight_decay: float = 1e-4,
                 input_noise: float = 0.03, export_path: str | None = "artifacts/b4b_victim_digits/encoder.pt"):
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"])
        self.encoder = encoder
        self.head = nn.Linear(encoder.rep_dim, n_classes)

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x + self.hparams.input_noise * torch.randn_like(x)
        loss = F.cross_entropy(self.head(self.encoder(x)), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.head(self.encoder(x))
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", (logits.argmax(1) == y).float().mean() * 100, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def on_fit_end(self) -> None:
        if self.hparams.export_path and self.trainer.is_global_zero:
            path = Path(self.hparams.export_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.encoder.state_dict(), path)
            rank_zero_info(f"victim encoder state dict written to {path}")


def _load_frozen(encoder: nn.Module, weights: str | None) -> nn.Module:
    """Load ``weights`` (a state dict) into ``encoder`` and freeze it; an encoder that loaded its own
    pretrained weights (``encoder.pretrained``, e.g. ``DinoViT``) needs none."""
    if weights is None and getattr(encoder, "pretrained", False):
        pass
    elif weights is None:
        raise ValueError("encoder_weights is not set: a served encoder needs trained weights (path to a state dict)")
    elif not Path(weights).is_file():
        raise FileNotFoundError(f"encoder weights {weights} not found; for the testbed run `rsgm fit --config configs/b4b_victim_digits.yaml` first, "
                                "otherwise put the state dict there or fix encoder_weights")
    else:
        load_encoder_weights(encoder, weights)
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


def _user_groups(user_ids) -> dict[str, list[int] | None]:
    """Sample positions per user, in order of first appearance (None: the whole batch)."""
    if isinstance(user_ids, str):
        return {user_ids: None}
    groups: dict[str, list[int]] = defaultdict(list)
    for i, u in enumerate(user_ids):
        groups[str(u)].append(i)
    return groups


class B4BEncoder(LightningModule):
    """An encoder served through the B4B defence.

    Batches are ``{"x": images, "user_id": str or list[str]}``.  ``predict_step`` returns
    ``{"representation", "user_id"}`` with defended representations; the clean ones never leave.
    State (coverage, query counts) persists in ``state_path`` (SQLite path or PostgreSQL URL);
    transforms and noise derive from the secret in ``secret_file`` (created on first use);
    ``defense`` is the one defence block (``rsgm.defenses.config.DefenseConfig`` fields).
    """

    def __init__(self, encoder: nn.Module, encoder_weights: str | None = None, state_path: str = "b4b_state.sqlite",
                 secret_file: str = "b4b_secret.bin", defense: dict | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"])
        self.defense_config = DefenseConfig.from_dict(defense)
        self.encoder = _load_frozen(encoder, encoder_weights)
        self.defense: B4BDefense | None = None

    def _defense(self, dim: int) -> B4BDefense:
        if self.defense is None:
            hp = self.hparams
            self.defense = B4BDefense(dim, hp.state_path, load_or_create_secret(hp.secret_file), self.defense_config)
        return self.defense

    @torch.no_grad()
    def defended(self, x: torch.Tensor, user_ids) -> tuple[torch.Tensor, dict]:
        """Defended answers for a batch that may mix users; also per-user (coverage, sigma, queries)."""
        r = self.encoder(x).float()
        defense = self._defense(r.shape[1])
        out = torch.empty(len(r), defense.out_dim, dtype=r.dtype, device=r.device)
        info = {}
        for user, idx in _user_groups(user_ids).items():
            if idx is None:
                idx = list(range(len(r)))
            resp = defense.respond(user, r[idx])
            out[idx] = resp.representation
            info[user] = resp
        return out, info

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        out, _ = self.defended(batch["x"], batch["user_id"])
        return {"representation": out, "user_id": batch["user_id"]}

    def test_step(self, batch, batch_idx):
        _, info = self.defended(batch["x"], batch["user_id"])
        for user, resp in info.items():
            self.log_dict({f"b4b/{user}/coverage": resp.coverage, f"b4b/{user}/sigma": resp.sigma,
                           f"b4b/{user}/queries": float(resp.n_queries)}, on_step=False, on_epoch=True, reduce_fx="max")
