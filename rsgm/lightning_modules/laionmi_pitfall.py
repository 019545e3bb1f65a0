"""Fine-tuning a trained diffusers UNet on a small set: the POKEMON setting of thesis ch. 7
re-created on the built-in digits (see :mod:`rsgm.datamodules.laionmi_pitfall`)."""

from __future__ import annotations

from pathlib import Path

from rsgm.errors import RSGMError
from rsgm.lightning_modules.diffusion import ClassConditionalDiffusion


class FineTunedDiffusion(ClassConditionalDiffusion):
    """:class:`ClassConditionalDiffusion` whose UNet starts from the exported model at
    ``init_from`` (a folder with ``unet/``); the architecture arguments must match it."""

    def __init__(self, init_from: str, **kwargs) -> None:
        super().__init__(**kwargs)
        from diffusers import UNet2DModel

        folder = Path(init_from) / "unet"
        if not folder.is_dir():
            raise RSGMError(f"pretrained model '{init_from}' lacks unet/: train it first with `rsgm fit --config configs/dm_digits.yaml --config configs/laionmi_pitfall_large.yaml`.")
        self.unet.load_state_dict(UNet2DModel.from_pretrained(folder, use_safetensors=True).state_dict())
