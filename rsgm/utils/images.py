"""Image preprocessing shared by the image-folder datamodules (no torchvision)."""

from __future__ import annotations

from PIL import Image


def resize_center_crop(img: Image.Image, size: int, short_side: int | None = None,
                       resample: int = Image.BICUBIC) -> Image.Image:
    """RGB image whose shorter side is resized to ``short_side`` (default ``size``), then
    centre-cropped to ``size`` x ``size``."""
    img = img.convert("RGB")
    w, h = img.size
    scale = (short_side or size) / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))
