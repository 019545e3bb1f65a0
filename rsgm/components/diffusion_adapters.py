"""Target diffusion models behind one small protocol, so attacks never import a model family.

An attack needs four things from a target (methods_spec §0.3):

* ``encode(x) -> z``: the latent the diffusion runs in (identity for pixel models; the
  autoencoder mean times its scaling factor for latent models). ``x`` is in [-1, 1].
* ``encode_cond(cond) -> y``: turns a batch's raw condition (class ids, captions) into what
  the denoiser consumes, once per batch so repeated network calls reuse it.
* ``eps(z_t, t, y) -> noise``: the epsilon prediction f_theta(z_t, t, y); ``t`` is a
  (batch,) long tensor of timesteps in 0..T-1.
* ``alphas_cumprod``: the (T,) tensor of cumulative noise levels, alpha-bar_0 close to 1.
* ``null_cond(batch_size)``: the "no condition" input (null class / empty caption), for
  attacks that contrast conditional and unconditional predictions.

Every adapter is an ``nn.Module``, so Lightning moves it to the run's device; weights are
frozen. Construction only records paths; ``load()`` reads the weights (the attack calls it
in ``setup``), so a config parses, and cached features re-run, without the weights present.
Everything loads from local folders only (diffusers with ``local_files_only``); a missing
folder raises a one-line error naming what to put where.

Other families (U-ViT, LDM-ImageNet, SiT, ...) plug in by subclassing
:class:`DiffusionTarget` and implementing ``eps`` (plus ``encode`` for latent models and
``encode_cond`` / ``null_cond`` for conditional ones), then naming the class in the attack
config's ``target: {class_path: ..., init_args: ...}``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time


# diffusers warns on every load that `accelerate` is missing unless told not to use it.
LOAD_KW = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}


def _require_folder(path: str | Path, what: str, expected: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found at '{path}': put {expected} there (nothing is downloaded).")
    return path


def _alphas_cumprod_from_scheduler(folder: Path) -> Tensor:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    return scheduler.alphas_cumprod.clone().float()


class DiffusionTarget(nn.Module):
    """Base class of the protocol; subclasses implement :meth:`eps` and, where needed, the rest.

    Subclasses that read weights from disk do it in :meth:`_load` and set ``alphas_cumprod``
    there; :meth:`load` runs it once and freezes the result.
    """

    def __init__(self, alphas_cumprod: Tensor | None = None) -> None:
        super().__init__()
        ab = None if alphas_cumprod is None else torch.as_tensor(alphas_cumprod, dtype=torch.float32).clone()
        self.register_buffer("alphas_cumprod", ab)
        self.loaded = ab is not None

    def _load(self) -> None:
        raise NotImplementedError

    def load(self) -> "DiffusionTarget":
        if not self.loaded:
            self._load()
            self.loaded = True
        return self.freeze()

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def encode(self, x: Tensor) -> Tensor:
        return x

    def encode_cond(self, cond):
        return cond

    def null_cond(self, batch_size: int):
        return None

    def eps(self, z_t: Tensor, t: Tensor, cond) -> Tensor:
        raise NotImplementedError

    def freeze(self) -> "DiffusionTarget":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self


def _first_half_if_learned_sigma(out: Tensor, channels: int) -> Tensor:
    # Models trained with learned variance (DiT, ADM) output [eps, sigma] stacked on channels.
    return out[:, :channels] if out.shape[1] == 2 * channels else out


class PixelUNetTarget(DiffusionTarget):
    """A diffusers ``UNet2DModel`` in pixel space, class-conditional when it has
    ``num_class_embeds`` (the null class is then the last class id).

    ``path`` is a folder with ``unet/`` and ``scheduler/`` subfolders (as written by
    ``DDPMPipeline.save_pretrained`` or by ``rsgm fit --config configs/dm_digits.yaml``).
    """

    def __init__(self, path: str | None = None, unet: nn.Module | None = None, alphas_cumprod: Tensor | None = None) -> None:
        if unet is None and path is None:
            raise ValueError("PixelUNetTarget needs a model folder (path) or a UNet2DModel with its alphas_cumprod.")
        super().__init__(alphas_cumprod if unet is not None else None)
        self.path, self.unet = path, unet

    def _load(self) -> None:
        from diffusers import UNet2DModel

        folder = _require_folder(self.path, "pixel diffusion model folder", "a diffusers folder with unet/ and scheduler/ subfolders")
        self.unet = UNet2DModel.from_pretrained(folder, **LOAD_KW, subfolder="unet", local_files_only=True)
        self.alphas_cumprod = _alphas_cumprod_from_scheduler(folder)

    def null_cond(self, batch_size: int):
        n = self.unet.config.num_class_embeds
        return None if n is None else torch.full((batch_size,), n - 1, dtype=torch.long, device=self.alphas_cumprod.device)

    def eps(self, z_t: Tensor, t: Tensor, cond) -> Tensor:
        labels = cond if self.unet.config.num_class_embeds is not None else None
        out = self.unet(z_t, t, class_labels=labels).sample
        return _first_half_if_learned_sigma(out, z_t.shape[1])


class DiTTarget(DiffusionTarget):
    """DiT (``DiTTransformer2DModel`` + ``AutoencoderKL`` + scheduler) from a saved diffusers
    ``DiTPipeline`` folder (``transformer/``, ``vae/``, ``scheduler/``), e.g. DiT-XL-2-256.

    The null class is ``num_embeds_ada_norm`` (1000 for ImageNet DiTs), as in classifier-free
    guidance training.
    """

    def __init__(self, path: str, dtype: str = "float32") -> None:
        super().__init__()
        self.path, self.dtype_name = path, dtype

    def _load(self) -> None:
        from diffusers import AutoencoderKL, DiTTransformer2DModel

        folder = _require_folder(self.path, "DiT pipeline folder", "a saved diffusers DiTPipeline (transformer/, vae/, scheduler/), e.g. facebook/DiT-XL-2-256")
        for sub in ("transformer", "vae", "scheduler"):
            _require_folder(folder / sub, f"DiT '{sub}' subfolder", f"the pipeline's {sub}/ folder")
        torch_dtype = getattr(torch, self.dtype_name)
        self.alphas_cumprod = _alphas_cumprod_from_scheduler(folder)
        self.transformer = DiTTransformer2DModel.from_pretrained(folder, **LOAD_KW, subfolder="transformer", local_files_only=True, torch_dtype=torch_dtype)
        self.vae = AutoencoderKL.from_pretrained(folder, **LOAD_KW, subfolder="vae", local_files_only=True, torch_dtype=torch_dtype)

    def encode(self, x: Tensor) -> Tensor:
        # The posterior mean, not a sample: the latent of an image should be deterministic.
        dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        return (dist.mean * self.vae.config.scaling_factor).float()

    def null_cond(self, batch_size: int):
        return torch.full((batch_size,), self.transformer.config.num_embeds_ada_norm, dtype=torch.long, device=self.alphas_cumprod.device)

    def eps(self, z_t: Tensor, t: Tensor, cond) -> Tensor:
        dt = self.transformer.dtype
        out = self.transformer(z_t.to(dt), timestep=t, class_labels=cond).sample.float()
        return _first_half_if_learned_sigma(out, z_t.shape[1])


class TextUNetTarget(DiffusionTarget):
    """Stable-Diffusion-style text-conditioned ``UNet2DConditionModel`` with its
    ``AutoencoderKL`` and CLIP text encoder, from a saved pipeline folder (``unet/``,
    ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``). Conditions are captions;
    the null condition is the empty caption. Needs the ``transformers`` package.
    """

    def __init__(self, path: str, dtype: str = "float32") -> None:
        super().__init__()
        self.path, self.dtype_name = path, dtype

    def _load(self) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        folder = _require_folder(self.path, "text-to-image pipeline folder", "a saved diffusers StableDiffusionPipeline (unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            _require_folder(folder / sub, f"pipeline '{sub}' subfolder", f"the pipeline's {sub}/ folder")
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as err:
            raise ImportError("text-conditioned targets need the 'transformers' package for the CLIP text encoder: pip install transformers") from err
        torch_dtype = getattr(torch, self.dtype_name)
        self.alphas_cumprod = _alphas_cumprod_from_scheduler(folder)
        self.unet = UNet2DConditionModel.from_pretrained(folder, **LOAD_KW, subfolder="unet", local_files_only=True, torch_dtype=torch_dtype)
        self.vae = AutoencoderKL.from_pretrained(folder, **LOAD_KW, subfolder="vae", local_files_only=True, torch_dtype=torch_dtype)
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True, torch_dtype=torch_dtype)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)

    def encode(self, x: Tensor) -> Tensor:
        dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        return (dist.mean * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def encode_cond(self, cond):
        tokens = self.tokenizer(list(cond), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(self.alphas_cumprod.device))[0]

    def null_cond(self, batch_size: int):
        return self.encode_cond([""] * batch_size)

    def eps(self, z_t: Tensor, t: Tensor, cond) -> Tensor:
        dt = self.unet.dtype
        out = self.unet(z_t.to(dt), t, encoder_hidden_states=cond.to(dt)).sample.float()
        return _first_half_if_learned_sigma(out, z_t.shape[1])


UNET_OPTIONS = ("image_size", "channels", "num_classes", "block_out_channels", "layers_per_block", "add_attention")


def class_conditional_unet(image_size: int = 8, channels: int = 1, num_classes: int = 10,
                           block_out_channels: tuple[int, ...] = (32, 64), layers_per_block: int = 1,
                           add_attention: bool = False) -> nn.Module:
    """The pixel UNet of rsgm's built-in diffusion targets (class ``num_classes`` is the null
    class of classifier-free guidance)."""
    from diffusers import UNet2DModel

    n = len(block_out_channels)
    return UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
        num_class_embeds=num_classes + 1, norm_num_groups=min(8, block_out_channels[0]),
        # Mid-block attention is 20x the cost of the rest on CPU at this size, for no gain on 8x8 digits.
        add_attention=add_attention,
    )


class RSGMCheckpointTarget(PixelUNetTarget):
    """A diffusion model trained by rsgm (``rsgm fit --config configs/dm_digits.yaml``),
    loaded from its Lightning checkpoint (``checkpoints/last.ckpt`` in the run folder)."""

    def __init__(self, checkpoint: str) -> None:
        DiffusionTarget.__init__(self)
        self.checkpoint, self.unet = checkpoint, None

    def _load(self) -> None:
        if not Path(self.checkpoint).is_file():
            raise FileNotFoundError(f"rsgm diffusion checkpoint not found at '{self.checkpoint}': train one with `rsgm fit --config configs/dm_digits.yaml` and pass its checkpoints/last.ckpt.")
        ckpt = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        hp, state = ckpt.get("hyper_parameters", {}), ckpt["state_dict"]
        self.unet = class_conditional_unet(**{k: hp[k] for k in UNET_OPTIONS if k in hp})
        self.unet.load_state_dict({k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")})
        self.alphas_cumprod = state["alphas_cumprod"].clone().float()
