"""DINO ViT encoder (ViT-S/16 by default) for the B4B DINO victim (thesis App. A.6.7, Table A.6.6).

The representation is the one DINO's linear evaluation uses: the class token of each of the last
``n_last_blocks`` transformer blocks after the final LayerNorm, concatenated (4 x 384 = 1536 for
ViT-S/16, the output size the thesis states).  Weights come from a local folder in the Hugging
Face layout of DINO's ViT-S/16 (``config.json`` and ``model.safetensors``); nothing is downloaded.
Without ``weights`` the architecture is built with random weights (tests, tiny smoke runs).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class DinoViT(nn.Module):
    """ViT with DINO's evaluation features; ``pretrained`` tells the B4B modules the weights are loaded.

    Args:
        weights: folder holding ``config.json`` and ``model.safetensors`` of DINO ViT-S/16.
        n_last_blocks: class tokens of this many last blocks are concatenated (4 for ViT-S).
        hidden_size, num_layers, num_heads, mlp_dim, patch_size, image_size, in_channels: the
            architecture when ``weights`` is None (defaults: ViT-S/16 at 224 pixels).
    """

    def __init__(self, weights: str | None = None, n_last_blocks: int = 4, hidden_size: int = 384, num_layers: int = 12,
                 num_heads: int = 6, mlp_dim: int = 1536, patch_size: int = 16, image_size: int = 224, in_channels: int = 3):
        super().__init__()
        from transformers import ViTConfig, ViTModel

        if weights is not None:
            folder = Path(weights)
            if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
                raise FileNotFoundError(f"DINO weights folder {folder} lacks config.json or model.safetensors; put DINO ViT-S/16 "
                                        "there in the Hugging Face layout (the dino-vits16 model files), or fix model.encoder.init_args.weights")
            self.vit = ViTModel.from_pretrained(folder, local_files_only=True, use_safetensors=True, add_pooling_layer=False)
        else:
            cfg = ViTConfig(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                            intermediate_size=mlp_dim, patch_size=patch_size, image_size=image_size, num_channels=in_channels)
            self.vit = ViTModel(cfg, add_pooling_layer=False)
        if not 1 <= n_last_blocks <= self.vit.config.num_hidden_layers:
            raise ValueError(f"n_last_blocks must be in [1, {self.vit.config.num_hidden_layers}], got {n_last_blocks}")
        self.pretrained = weights is not None
        self.n_last_blocks = n_last_blocks
        self.rep_dim = n_last_blocks * self.vit.config.hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.vit(pixel_values=x, output_hidden_states=True).hidden_states[-self.n_last_blocks:]
        return torch.cat([self.vit.layernorm(h[:, 0]) for h in hidden], dim=-1)
