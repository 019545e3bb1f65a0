"""Generators, discriminators and auxiliary regressors for the conditional-GAN family.

All generators take ``(z, cond)`` and every discriminator returns ``(logit, features)``,
where ``features`` is its penultimate layer: the encoder E of SDI-GAN's feature distance
(thesis eqs. 4.6-4.7). The condition enters the discriminator before that layer, so E sees c.

ZDC shapes follow the thesis and the authors' reference networks: the generator maps
``z ++ c`` through Linear(.., 256) and Linear(256, 128 * h0 * w0), then an upsampling /
3x3-convolution stack with BatchNorm, Dropout(0.2) and LeakyReLU(0.1); the discriminator is
conv3x3(32)-pool, conv3x3(16)-pool, flatten ++ c -> 128 -> 64 -> 1. ``width`` scales every
hidden channel count of the generator: 1.0 is the thesis-size network (about 1 GFLOP per
proton sample), 0.25 a compact one with about 12x fewer FLOPs.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from rsgm.components.zdc_inference import FusedZDCGenerator
from rsgm.physics.simulator import IMAGE_SHAPES

# Spatial size after the dense layer, then the size after the first upsampling.
_GRID = {"neutron": ((11, 11), (22, 22)), "proton": ((20, 10), (40, 20))}


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.Dropout(0.2), nn.LeakyReLU(0.1)]


class ZDCGenerator(nn.Module):
    """G(z, c) -> a (1, H, W) response in log1p photon space.

    The output is clipped to [0, log1p(max_photons)] (a ReLU6-style bound): no fibre sees
    more photons than a whole shower holds (3,360 at most in the published neutron data),
    and the bound keeps a briefly unstable generator from emitting exp(20)-photon pixels.

    ``fused_inference`` (default on): compiled generation (``compile_generator``) runs
    :class:`~rsgm.components.zdc_inference.FusedZDCGenerator`, the same eval-mode function
    with BatchNorm folded, upsampling + convolution as sub-pixel convolutions and a
    channels-last layout (equal up to float rounding); off, it compiles this module as is.
    ``inference_dtype="bfloat16"`` (opt-in, with ``fused_inference``) runs that form in
    bfloat16: faster on CPUs with AVX512-BF16, about 3 significant digits.
    """

    def __init__(self, detector: Literal["neutron", "proton"] = "neutron", noise_dim: int = 10, cond_dim: int = 9,
                 width: float = 1.0, max_photons: float = 4000.0, fused_inference: bool = True,
                 inference_dtype: Literal["float32", "bfloat16"] = "float32") -> None:
        super().__init__()
        if detector not in IMAGE_SHAPES:
            raise ValueError(f"unknown detector {detector!r}; choose one of {sorted(IMAGE_SHAPES)}")
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        self.noise_dim, self.cond_dim, self.image_shape = noise_dim, cond_dim, IMAGE_SHAPES[detector]
        if inference_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"inference_dtype must be float32 or bfloat16, got {inference_dtype!r}")
        self.fused_inference, self.inference_dtype = fused_inference, inference_dtype
        (h0, w0), mid = _GRID[detector]
        c0, c1, c2 = (max(4, round(c * width)) for c in (128, 128, 64))
        self.dense = nn.Sequential(
            nn.Linear(noise_dim + cond_dim, 256), nn.BatchNorm1d(256), nn.Dropout(0.2), nn.LeakyReLU(0.1),
            nn.Linear(256, c0 * h0 * w0), nn.BatchNorm1d(c0 * h0 * w0), nn.Dropout(0.2), nn.LeakyReLU(0.1),
        )
        self.grid = (c0, h0, w0)
        self.convs = nn.Sequential(
            nn.Upsample(size=mid), *_conv_block(c0, c1), *_conv_block(c1, c1),
            nn.Upsample(size=self.image_shape), *_conv_block(c1, c2), *_conv_block(c2, c2),
            nn.Conv2d(c2, 1, 3, padding=1), nn.Hardtanh(0.0, math.log1p(max_photons)),
        )

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.dense(torch.cat([z, cond], dim=1)).view(-1, *self.grid)
        return self.convs(h)

    def inference_form(self) -> nn.Module:
        """The module that generation compiles: the fused form, or this one."""
        if not self.fused_inference:
            return self
        return FusedZDCGenerator(self, dtype=getattr(torch, self.inference_dtype))


class ZDCDiscriminator(nn.Module):
    """D(x, c) -> (logit, 64-d penultimate features)."""

    def __init__(self, detector: Literal["neutron", "proton"] = "neutron", cond_dim: int = 9) -> None:
        super().__init__()
        rows, cols = IMAGE_SHAPES[detector]
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
            nn.Conv2d(32, 16, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2), nn.Flatten(),
        )
        flat = 16 * (rows // 4) * (cols // 4)
        self.encoder = nn.Sequential(
            nn.Linear(flat + cond_dim, 128), nn.LeakyReLU(0.1), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.LeakyReLU(0.1),
        )
        self.head = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(torch.cat([self.convs(x), cond], dim=1))
        return self.head(features).squeeze(1), features


class PeakRegressor(nn.Module):
    """A(x) -> (row, col) of the brightest pixel, both scaled to [0, 1] (thesis eq. 5.4)."""

    def __init__(self, detector: Literal["neutron", "proton"] = "neutron") -> None:
        super().__init__()
        rows, cols = IMAGE_SHAPES[detector]
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * (rows // 4) * (cols // 4), 64), nn.LeakyReLU(0.1), nn.Linear(64, 2), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLPGenerator(nn.Module):
    """G(z, c) for vector data such as the 2-D benchmark points.

    ``noise_gain=True`` scales z by a learned, condition-dependent positive gain
    ``exp(W c + b)`` before the MLP (log-parameterised, so the spread of a condition can
    change by orders of magnitude); it changes the architecture only, identically for every
    regulariser. ``init_log_gain`` (with ``noise_gain``) starts the gain at ``exp(init_log_gain)``
    for every condition (zero weights, that bias) instead of PyTorch's random initialisation.
    """

    def __init__(self, out_dim: int = 2, noise_dim: int = 8, cond_dim: int = 10, hidden: int = 128, depth: int = 3,
                 noise_gain: bool = False, init_log_gain: float | None = None) -> None:
        super().__init__()
        self.noise_dim, self.cond_dim = noise_dim, cond_dim
        self.log_gain = nn.Linear(cond_dim, noise_dim) if noise_gain else None
        if self.log_gain is not None and init_log_gain is not None:
            nn.init.zeros_(self.log_gain.weight)
            nn.init.constant_(self.log_gain.bias, init_log_gain)
        layers: list[nn.Module] = []
        d = noise_dim + cond_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.LeakyReLU(0.2)]
            d = hidden
        self.net = nn.Sequential(*layers, nn.Linear(d, out_dim))

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.log_gain is not None:
            z = z * self.log_gain(cond).exp()
        return self.net(torch.cat([z, cond], dim=1))


class MLPDiscriminator(nn.Module):
    """D(x, c) -> (logit, penultimate features) for vector data."""

    def __init__(self, in_dim: int = 2, cond_dim: int = 10, hidden: int = 128, feature_dim: int = 64) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(in_dim + cond_dim, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, feature_dim), nn.LeakyReLU(0.2),
        )
        self.head = nn.Linear(feature_dim, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(torch.cat([x, cond], dim=1))
        return self.head(features).squeeze(1), features


class CompiledForInference:
    """Calls a module under ``torch.compile`` (dynamic batch size) for generation, falling
    back to eager when compilation is unavailable or fails (e.g. no C++ compiler for
    inductor on CPU); the fallback is logged once per process. What it compiles is the
    module's ``inference_form()`` when it has one (``ZDCGenerator``: the fused form, kept in
    step with the module's weights before every call), else the module itself.

    Not an ``nn.Module``: it is never part of a state dict, and the eager module it wraps
    stays the one that trains and is checkpointed. Only use it without gradients.
    """

    _fallback_said = False

    def __init__(self, module: nn.Module, log=print) -> None:
        self.module, self.log = module, log
        self.form: nn.Module | None = None
        self.compiled = None
        self.failed = False

    def inference_form(self) -> nn.Module:
        if self.form is None:
            self.form = self.module.inference_form() if hasattr(self.module, "inference_form") else self.module
        if self.form is not self.module and hasattr(self.form, "refresh"):
            self.form.refresh()
        return self.form

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        form = self.inference_form()
        if not self.failed:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(form, dynamic=True)
                return self.compiled(*args)
            except Exception as err:  # noqa: BLE001  any compiler failure: eager gives the same result
                self.failed = True
                if not CompiledForInference._fallback_said:
                    CompiledForInference._fallback_said = True
                    self.log(f"torch.compile is unavailable here ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                             "generating in eager mode")
        return form(*args)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "compiled": None, "form": None}  # derived; rebuilt after deepcopy / spawn
