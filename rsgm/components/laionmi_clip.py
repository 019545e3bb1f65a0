"""CLIP text and image embeddings from a local ``transformers`` folder, for building and
assessing LAION-mi (:mod:`rsgm.privacy.laionmi_build`).

The folder holds a ``CLIPModel`` (config + safetensors weights), its tokenizer and its image
processor, as ``save_pretrained`` writes them (e.g. openai/clip-vit-large-patch14).
Embeddings are the projected features (``get_text_features`` / ``get_image_features``),
unit-normalised by default, so L2 distances lie in [0, 2] and the 0.5 duplicate threshold
of §7.5.3 applies.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from rsgm.errors import RSGMError

CLIP_HINT = "a transformers CLIPModel folder (config.json, model.safetensors, tokenizer and preprocessor files), e.g. openai/clip-vit-large-patch14"


def _features(out) -> Tensor:
    # transformers 4.x returns the projected tensor, 5.x a model output holding it.
    return out if isinstance(out, Tensor) else out.pooler_output


class ClipEmbedder:
    def __init__(self, path: str, device: str = "cpu", normalize: bool = True, batch_size: int = 256) -> None:
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise RSGMError(f"CLIP folder '{folder}' not found or without config.json: put {CLIP_HINT} there.")
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).to(device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
            self.processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        except OSError as err:
            raise RSGMError(f"CLIP folder '{folder}' is incomplete ({str(err).splitlines()[0]}): put {CLIP_HINT} there.") from err
        self.device, self.normalize, self.batch_size = device, normalize, batch_size

    def _post(self, f: Tensor) -> Tensor:
        f = f.float().cpu()
        return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12) if self.normalize else f

    @torch.no_grad()
    def text(self, captions: list[str]) -> Tensor:
        out = []
        for s in range(0, len(captions), self.batch_size):
            tok = self.tokenizer(list(captions[s: s + self.batch_size]), padding=True, truncation=True, return_tensors="pt").to(self.device)
            out.append(self._post(_features(self.model.get_text_features(**tok))))
        return torch.cat(out)

    @torch.no_grad()
    def images(self, images: list) -> Tensor:
        """``images``: PIL images or paths."""
        from PIL import Image

        out = []
        for s in range(0, len(images), self.batch_size):
            batch = [Image.open(im).convert("RGB") if isinstance(im, (str, Path)) else im.convert("RGB") for im in images[s: s + self.batch_size]]
            px = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(self._post(_features(self.model.get_image_features(pixel_values=px))))
        return torch.cat(out)
