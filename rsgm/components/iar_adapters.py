"""Image autoregressive targets behind one small protocol, so attacks never import a model family.

Token models (VAR, RAR, rsgm's raster and next-scale IARs), ``kind = "token"``:

* ``tokenize(images) -> tokens`` (B, N) long, in the model's prediction order; images in [-1, 1];
* ``logits(tokens, cond) -> (B, N, V)``: teacher-forced, position n predicts token n; called
  with the true class and with ``null_cond(B)`` for the CFG difference;
* ``decode(tokens) -> images``;
* ``complete(prefix, cond) -> tokens``: greedy completion of the positions after a prefix
  (B, i), no CFG (the extraction attack, methods_spec §6.8).

Masked continuous-token models (MAR, rsgm's masked IAR), ``kind = "masked"``:

* ``tokenize`` / ``decode`` as above, tokens (B, N, D) float;
* ``random_mask(B, ratio, generator) -> (B, N) bool`` (True = masked);
* ``token_losses(tokens, cond, t, mask, eps, token_noise=None) -> (B, N)``: the per-token
  diffusion loss of eq. 9.3 at timestep ``t``, averaged over the noise draws ``eps`` (draws,
  B, N, D) (NaN where unmasked); one backbone pass per call. ``token_noise`` (draws, B, N, D)
  is the mitigation: the defended API returns the head's clean-token prediction plus this
  noise, and the loss is computed from the noise prediction that implies;
* ``complete(tokens, known, cond) -> tokens``: fill the unknown tokens.

Every adapter counts its network calls in ``calls`` (samples passed through the backbone),
so a benchmark can show that feature extraction costs at most two passes per sample per
draw. Class dropout is a training-time behaviour: adapters switch it off (``eval()`` and,
for VAR, ``cond_drop_rate = 0``) so the class given is the class used.

A missing checkpoint or code folder raises a one-line :class:`rsgm.errors.RSGMError`.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

from rsgm.components.iar import BUILTIN_IARS
from rsgm.errors import RSGMError


def _require(path: str | Path, what: str, hint: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise RSGMError(f"{what} not found at '{path}': {hint} (nothing is downloaded).")
    return path


class IARTarget(nn.Module):
    """Base of the protocol; ``load()`` reads weights once (called by the attack's ``setup``)."""

    kind = "token"

    def __init__(self) -> None:
        super().__init__()
        self.loaded = False
        self.calls: Counter = Counter()

    def _load(self) -> None:
        raise NotImplementedError

    def load(self) -> "IARTarget":
        if not self.loaded:
            self._load()
            self.loaded = True
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "IARTarget":
        return super().train(False)  # a target is always in eval mode: no dropout, no class dropout

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def null_cond(self, batch_size: int, device=None) -> Tensor:
        return torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)


class BuiltinIARTarget(IARTarget):
    """An rsgm built-in IAR exported by ``rsgm fit --config configs/{iar,var,mar}_digits.yaml``:
    ``<path>/config.json`` (class and arguments) and ``<path>/model.safetensors``."""

    def __init__(self, path: str | None = None, model: nn.Module | None = None) -> None:
        super().__init__()
        self.path, self.model = path, model
        if model is not None:
            self.kind, self.loaded = model.kind, True
        elif path is not None:
            cfg = self._config()
            self.kind = BUILTIN_IARS[cfg["class"]].kind

    def _config(self) -> dict:
        folder = _require(self.path, "built-in IAR folder", "train it first with `rsgm fit --config configs/iar_digits.yaml` (or var_/mar_digits.yaml)")
        cfg = _require(folder / "config.json", "built-in IAR config", "export the model with `rsgm fit`, which writes config.json beside model.safetensors")
        return json.loads(cfg.read_text())

    def _load(self) -> None:
        from safetensors.torch import load_file

        cfg = self._config()
        weights = _require(Path(self.path) / "model.safetensors", "built-in IAR weights", "export the model with `rsgm fit`")
        self.model = BUILTIN_IARS[cfg["class"]](**cfg["kwargs"])
        self.model.load_state_dict(load_file(str(weights)))

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def tokenize(self, images: Tensor) -> Tensor:
        return self.model.tokenize(images)

    def decode(self, tokens: Tensor) -> Tensor:
        return self.model.decode(tokens)

    def logits(self, tokens: Tensor, cond: Tensor) -> Tensor:
        self.calls["forward"] += tokens.shape[0]
        return self.model.logits(tokens, cond)

    def complete(self, *args, **kw) -> Tensor:
        """Token models: ``complete(prefix, cond)``; masked models: ``complete(tokens, known, cond)``."""
        self.calls["complete"] += args[0].shape[0]
        return self.model.complete(*args, **kw)

    def random_mask(self, B: int, ratio, generator=None, device=None) -> Tensor:
        return self.model.random_mask(B, ratio, generator, device)

    def token_losses(self, tokens: Tensor, cond: Tensor, t, mask: Tensor, eps: Tensor, token_noise: Tensor | None = None) -> Tensor:
        # passes of the defended (noisy) API are counted apart: they are the mitigation's, not the MIAs'
        key = "forward" if token_noise is None else "forward_defended"
        self.calls[key] += tokens.shape[0]
        self.calls["head"] += tokens.shape[0] * eps.shape[0]
        return self.model.token_losses(tokens, cond, t, mask, eps, token_noise)

    def sample(self, cond: Tensor, **kw) -> Tensor:
        return self.model.sample(cond, **kw)


def export_builtin(model: nn.Module, folder: str | Path, split: dict | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``membership.json``) for :class:`BuiltinIARTarget`."""
    from safetensors.torch import save_file

    name = type(model).__name__
    if name not in BUILTIN_IARS:
        raise RSGMError(f"export_builtin: {name} is not a built-in IAR (one of {sorted(BUILTIN_IARS)}).")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"class": name, "kwargs": model.init_kwargs}, indent=1))
    if split is not None:
        (folder / "membership.json").write_text(json.dumps(split))
    return folder


# --------------------------------------------------------------------------- official VAR


class VARTarget(IARTarget):
    """An official VAR checkpoint (next-scale prediction, ImageNet 256) from local code and weights.

    ``code_dir``: a checkout of the VAR repository (it must contain the ``models`` package
    with ``build_vae_var``); ``vae_ckpt``: the VQVAE weights (``vae_ch160v4096z32.pth``);
    ``var_ckpt``: the transformer (``var_d16.pth`` ... ``var_d30.pth``); ``depth``: 16..30.
    Weights are read with ``torch.load(weights_only=True)``. The official ``VAR.forward(label_B,
    x_BLCv_wo_first_l)`` drops the class with probability ``cond_drop_rate`` on *every*
    call, so this adapter sets it to 0: otherwise a random share of the "conditional" passes
    would silently be unconditional.
    """

    def __init__(self, code_dir: str, vae_ckpt: str, var_ckpt: str, depth: int = 16, num_classes: int = 1000,
                 patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), vocab_size: int = 4096) -> None:
        super().__init__()
        self.code_dir, self.vae_ckpt, self.var_ckpt = code_dir, vae_ckpt, var_ckpt
        self.depth, self._num_classes, self.patch_nums = depth, num_classes, tuple(patch_nums)
        self.vocab_size, self.vae, self.var = vocab_size, None, None

    def _load(self) -> None:
        code = _require(self.code_dir, "VAR code folder", "clone the VAR repository there (it must hold models/__init__.py with build_vae_var)")
        vae_w = _require(self.vae_ckpt, "VAR VQVAE checkpoint", "put vae_ch160v4096z32.pth there")
        var_w = _require(self.var_ckpt, "VAR transformer checkpoint", f"put var_d{self.depth}.pth there")
        if str(code) not in sys.path:
            sys.path.insert(0, str(code))
        try:
            build = importlib.import_module("models").build_vae_var
        except (ImportError, AttributeError) as e:
            raise RSGMError(f"VAR code at '{code}' has no models.build_vae_var ({e}); point code_dir at a VAR checkout.") from None
        vae, var = build(V=self.vocab_size, Cvae=32, ch=160, share_quant_resi=4, device="cpu", patch_nums=self.patch_nums,
                         num_classes=self._num_classes, depth=self.depth, shared_aln=False)
        vae.load_state_dict(torch.load(vae_w, map_location="cpu", weights_only=True), strict=True)
        var.load_state_dict(torch.load(var_w, map_location="cpu", weights_only=True), strict=True)
        var.cond_drop_rate = 0.0  # class dropout off while scoring (see the class docstring)
        self.vae, self.var = vae, var

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def _split(self, tokens: Tensor) -> list[Tensor]:
        out, a = [], 0
        for p in self.patch_nums:
            out.append(tokens[:, a:a + p * p])
            a += p * p
        return out

    def tokenize(self, images: Tensor) -> Tensor:
        return torch.cat(self.vae.img_to_idxBl(images), 1)

    def decode(self, tokens: Tensor) -> Tensor:
        return self.vae.idxBl_to_img(self._split(tokens), same_shape=True, last_one=True)

    def logits(self, tokens: Tensor, cond: Tensor) -> Tensor:
        self.calls["forward"] += tokens.shape[0]
        x = self.vae.quantize.idxBl_to_var_input(self._split(tokens))
        return self.var(cond, x)

    @torch.no_grad()
    def complete(self, prefix: Tensor, cond: Tensor) -> Tensor:
        """Greedy scale-by-scale completion with teacher forcing of the prefix (one pass per scale)."""
        B, n0 = prefix.shape
        L = sum(p * p for p in self.patch_nums)
        tokens = torch.zeros(B, L, dtype=torch.long, device=prefix.device)
        tokens[:, :n0] = prefix
        a = 0
        for p in self.patch_nums:
            b = a + p * p
            if b > n0:
                new = self.logits(tokens, cond)[:, a:b].argmax(-1)
                keep = torch.arange(a, b, device=prefix.device) < n0
                tokens[:, a:b] = torch.where(keep, tokens[:, a:b], new)
            a = b
        return tokens
