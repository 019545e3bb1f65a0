"""Stable Diffusion (text-conditioned latent diffusion) behind the diffusion adapter protocol.

:class:`StableDiffusionTarget` reads a local diffusers folder in the layout
``StableDiffusionPipeline.save_pretrained`` writes (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``), e.g. ``CompVis/stable-diffusion-v1-4``. On top of the
protocol of :mod:`rsgm.components.diffusion_adapters` (``encode``, ``encode_cond``,
``eps``, ``alphas_cumprod``, ``null_cond``) it decodes latents (``decode``), which the
LAION-mi pixel-error signals and the generation attacks need.

A missing folder or component stops with one line naming what to put where.
:func:`save_tiny_stable_diffusion` writes tiny random components in the same layout (the
sizes of diffusers' own pipeline tests) for smoke runs and tests: no download.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from rsgm.components.diffusion_adapters import LOAD_KW, TextUNetTarget, _alphas_cumprod_from_scheduler
from rsgm.errors import RSGMError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SD14_HINT = "the diffusers folder of Stable Diffusion v1.4 (CompVis/stable-diffusion-v1-4: unet/, vae/, text_encoder/, tokenizer/, scheduler/)"


class StableDiffusionTarget(TextUNetTarget):
    """Args:
        path: the local diffusers pipeline folder.
        dtype: float32 (CPU) or float16 / bfloat16 on a GPU.
    """

    def _load(self) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = Path(self.path)
        if not folder.is_dir():
            raise RSGMError(f"Stable Diffusion folder '{folder}' not found: put {SD14_HINT} there.")
        for sub in COMPONENTS:
            if not (folder / sub).is_dir():
                raise RSGMError(f"Stable Diffusion folder '{folder}' lacks {sub}/: put {SD14_HINT} there.")
        dt = getattr(torch, self.dtype_name)
        try:
            self.alphas_cumprod = _alphas_cumprod_from_scheduler(folder)
            self.unet = UNet2DConditionModel.from_pretrained(folder, **LOAD_KW, subfolder="unet", local_files_only=True, use_safetensors=True, torch_dtype=dt)
            self.vae = AutoencoderKL.from_pretrained(folder, **LOAD_KW, subfolder="vae", local_files_only=True, use_safetensors=True, torch_dtype=dt)
            self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True, use_safetensors=True, torch_dtype=dt)
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        except OSError as err:  # a component folder without its weights or config
            raise RSGMError(f"Stable Diffusion folder '{folder}' is incomplete ({str(err).splitlines()[0]}): put {SD14_HINT} there.") from err

    @property
    def image_size(self) -> int:
        """Pixel side the UNet was trained at: latent side x the VAE's downsampling."""
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def decode(self, z: Tensor) -> Tensor:
        """Latent (scaled as ``encode`` returns it) to an image in [-1, 1] (not clamped)."""
        return self.vae.decode((z / self.vae.config.scaling_factor).to(self.vae.dtype)).sample.float()


def _byte_level_vocab() -> dict[str, int]:
    """A character-level CLIP BPE vocabulary: every byte symbol alone and word-final."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def save_tiny_stable_diffusion(folder: str | Path, seed: int = 0, sample_size: int = 8, max_length: int = 16) -> Path:
    """Write tiny random SD components (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
    a character-level CLIPTokenizer, the SD scheduler) in the diffusers layout. Images are
    ``2 * sample_size`` pixels square."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                         cross_attention_dim=32, norm_num_groups=2).save_pretrained(folder / "unet")
    AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=2,
                  sample_size=2 * sample_size).save_pretrained(folder / "vae")
    vocab = _byte_level_vocab()
    CLIPTextModel(CLIPTextConfig(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
                                 hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                 vocab_size=len(vocab), max_position_embeddings=max_length)).save_pretrained(folder / "text_encoder")
    tok = folder / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"), model_max_length=max_length).save_pretrained(tok)
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  clip_sample=False).save_pretrained(folder / "scheduler")
    return folder
