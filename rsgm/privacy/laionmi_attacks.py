"""Membership signals of Table 7.7.1 / App. B.4 (methods_spec §4.4-4.5), as tensor maths.

Every attack runs a chain of UNet calls over a schedule and records, at *every* call, three
signals per sample (all "lower = member"):

* model loss   ||eps - eps_hat||^2, eps the noise that built the chain's input
  (the starting noise for iterative chains, the fresh draw for non-iterative ones);
* latent error ||z - z'||^2, z' the predicted clean latent (z_t - sqrt(1-abar_t) eps_hat) / sqrt(abar_t);
* pixel error  ||x - D(z')||^2, D the target's decoder (identity for pixel models).

eps_hat uses classifier-free guidance eps_u + s (eps_c - eps_u) with s = 7.5 unless the method
says otherwise. Iterative chains move the latent between consecutive timesteps with the
deterministic DDIM step of §0.3 (downwards when denoising, upwards for reversed denoising).
The generation attacks sample from pure noise with the prompt and compare the result with
the image (pixel error, black-box) or its latent (latent error, grey-box). Each signal is
averaged over ``passes`` independent noise draws (5 in the thesis).

Choices where the thesis is silent ([UNSPEC]): the latent shift at t = 170 adds
``latent_shift`` (0.1) x N(0, I); the text shift is drawn once per sample and applied at
every step; "no CFG" means the conditional prediction alone; generation uses DDIM with
``generation_steps`` (50) steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from rsgm.privacy.diffusion_features import ddim_move, sample_noise

SIGNALS = ("model_loss", "latent_error", "pixel_error")
_STREAM = 11  # noise stream of sample_noise, distinct from the CDI features' streams


@dataclass(frozen=True)
class AttackMethod:
    """One row of Table B.4.2: where the chain starts, which timesteps the UNet sees, how."""

    name: str
    timesteps: tuple[int, ...]
    start_level: int | None = None      # abar index of the starting latent; None: per-step levels
    step_levels: tuple[int, ...] | None = None  # non-iterative: abar index of each step's fresh copy
    iterative: bool = True
    guidance: float | None = 7.5        # None: conditional prediction only
    text_shift: float = 0.0
    latent_shift_at: int | None = None
    generation: bool = False

    @property
    def n_steps(self) -> int:
        return 1 if self.generation else len(self.timesteps)


def _down(a: int, b: int, step: int) -> tuple[int, ...]:
    return tuple(range(a, b - 1, -step))


_FULL = _down(900, 0, 100)  # 900, 800, ..., 0
_PARTIAL = _down(300, 50, 10)  # 300, 290, ..., 50: 26 steps


def attack_methods(reversed_guidance: float = 100.0) -> dict[str, AttackMethod]:
    """The 16 white-box methods of App. B.4.1 plus the two generation attacks (rows 17, 18)."""
    m = [
        AttackMethod("baseline_loss", (100,), start_level=100, iterative=False),
        AttackMethod("partial_denoising", _PARTIAL, start_level=300),
        AttackMethod("partial_denoising_non_iterative", _PARTIAL, step_levels=_PARTIAL, iterative=False),
        AttackMethod("partial_denoising_latent_shift", _PARTIAL, start_level=300, latent_shift_at=170),
        AttackMethod("partial_denoising_text_shift", _PARTIAL, start_level=300, text_shift=0.1),
        AttackMethod("partial_denoising_bigger_text_shift", _PARTIAL, start_level=300, text_shift=0.5),
        AttackMethod("partial_denoising_wrong_start", _PARTIAL, start_level=100),
        AttackMethod("full_denoising_start_100", _FULL, start_level=100),
        AttackMethod("full_denoising_start_100_text_shift", _FULL, start_level=100, text_shift=0.1),
        AttackMethod("full_denoising_start_50", _FULL, start_level=50),
        AttackMethod("full_denoising_start_300", _FULL, start_level=300),
        AttackMethod("short_denoising_start_300", (200, 100, 0), start_level=300),
        AttackMethod("reversed_noising", _FULL, step_levels=tuple(900 - t for t in _FULL), iterative=False, guidance=reversed_guidance),
        AttackMethod("full_denoising_300_no_cfg", _FULL, start_level=300, guidance=None),
        AttackMethod("full_denoising_100_non_iterative", _FULL, step_levels=(100,) * len(_FULL), iterative=False),
        AttackMethod("reversed_noising_regular_cfg", _FULL, step_levels=tuple(900 - t for t in _FULL), iterative=False),
        AttackMethod("reversed_denoising", tuple(reversed(_FULL)), start_level=100),
        AttackMethod("generation_grey_box", (), generation=True),
        AttackMethod("generation_black_box", (), generation=True),
    ]
    return {a.name: a for a in m}


@dataclass
class ChainConfig:
    passes: int = 5
    latent_shift: float = 0.1
    generation_steps: int = 50
    generation_guidance: float = 7.5
    seed: int = 0
    methods: dict[str, AttackMethod] = field(default_factory=attack_methods)


def _sq(v: Tensor) -> Tensor:
    return v.flatten(1).pow(2).sum(1)


def _noise(index: Tensor, shape, seed: int, salt: int, ref: Tensor) -> Tensor:
    return sample_noise(index, tuple(shape), seed, _STREAM * 1000 + salt, ref.device, ref.dtype)


def guided_eps(target, z_t: Tensor, t: Tensor, y, y_null, guidance: float | None) -> Tensor:
    """eps_u + s (eps_c - eps_u), both halves in one batched call; s = None: eps_c alone."""
    if guidance is None:
        return target.eps(z_t, t, y)
    both = target.eps(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([y, y_null]))
    e_c, e_u = both.chunk(2)
    return e_u + guidance * (e_c - e_u)


def _decode(target, z: Tensor) -> Tensor:
    return target.decode(z) if hasattr(target, "decode") else z


def chain_signals(target, method: AttackMethod, x: Tensor, z: Tensor, y, y_null, index: Tensor,
                  cfg: ChainConfig, pass_id: int = 0) -> Tensor:
    """(B, n_steps, 3) signals of one pass of ``method``; noise depends only on (seed, method,
    pass, sample index), so a sample's signals do not depend on its batch."""
    ab = target.alphas_cumprod.to(z.device, z.dtype)
    B = z.shape[0]
    salt = 37 * (list(cfg.methods).index(method.name) + 1) + pass_id
    full = lambda s: torch.full((B,), int(s), dtype=torch.long, device=z.device)  # noqa: E731
    noised = lambda lvl, e: ab[lvl].sqrt() * z + (1 - ab[lvl]).sqrt() * e  # noqa: E731
    if method.generation:
        return _generation_signals(target, method, x, z, y, y_null, index, cfg, salt)
    if method.text_shift:
        if not torch.is_floating_point(y):
            raise ValueError(f"{method.name} shifts the text embedding; the target's condition is not an embedding (use it with text-conditioned targets only).")
        y = y + method.text_shift * _noise(index, y.shape[1:], cfg.seed, salt + 500, y)
    eps0 = _noise(index, z.shape[1:], cfg.seed, salt, z)
    z_in = noised(method.start_level, eps0) if method.iterative else None
    out = []
    for k, t in enumerate(method.timesteps):
        target_eps = eps0
        if not method.iterative:
            lvl = method.step_levels[k] if method.step_levels is not None else method.start_level
            target_eps = _noise(index, z.shape[1:], cfg.seed, salt + 1000 * (k + 1), z)
            z_in = noised(lvl, target_eps)
        if method.latent_shift_at is not None and t == method.latent_shift_at:
            z_in = z_in + cfg.latent_shift * _noise(index, z.shape[1:], cfg.seed, salt + 900, z)
        e = guided_eps(target, z_in, full(t), y, y_null, method.guidance)
        z0 = (z_in - (1 - ab[t]).sqrt() * e) / ab[t].sqrt()
        out.append(torch.stack([_sq(target_eps - e), _sq(z - z0), _sq(x - _decode(target, z0))], 1))
        if method.iterative and k + 1 < len(method.timesteps):
            z_in = ddim_move(ab, z_in, t, method.timesteps[k + 1], e)
    return torch.stack(out, 1)


def ddim_sample(target, y, y_null, z_T: Tensor, steps: int, guidance: float) -> Tensor:
    """Deterministic DDIM sampling from pure noise z_T over ``steps`` evenly spaced timesteps."""
    ab = target.alphas_cumprod.to(z_T.device, z_T.dtype)
    T = ab.numel()
    ts = [int(t) for t in np.linspace(T - 1, 0, steps).round()]
    z = z_T
    for k, t in enumerate(ts):
        e = guided_eps(target, z, torch.full((z.shape[0],), t, dtype=torch.long, device=z.device), y, y_null, guidance)
        if k + 1 < len(ts):
            z = ddim_move(ab, z, t, ts[k + 1], e)
        else:
            z = (z - (1 - ab[t]).sqrt() * e) / ab[t].sqrt()
    return z


def _generation_signals(target, method, x, z, y, y_null, index, cfg: ChainConfig, salt: int) -> Tensor:
    z_T = _noise(index, z.shape[1:], cfg.seed, salt, z)
    x_gen = _decode(target, ddim_sample(target, y, y_null, z_T, cfg.generation_steps, cfg.generation_guidance)).clamp(-1, 1)
    # Grey-box: the attacker re-encodes the generated image with the public encoder.
    lat = _sq(z - target.encode(x_gen))
    pix = _sq(x - x_gen)
    nan = torch.full_like(lat, float("nan"))  # no model loss without the UNet's own noise
    row = torch.stack([nan, lat, nan] if method.name == "generation_grey_box" else [nan, nan, pix], 1)
    return row.unsqueeze(1)


def method_signals(target, method: AttackMethod, x: Tensor, z: Tensor, y, y_null, index: Tensor, cfg: ChainConfig) -> Tensor:
    """(B, n_steps, 3): the mean over ``cfg.passes`` independent passes."""
    return torch.stack([chain_signals(target, method, x, z, y, y_null, index, cfg, p) for p in range(cfg.passes)]).mean(0)


def signal_names(methods: list[AttackMethod]) -> list[str]:
    """Column names ``method/signal/t<t>`` in the layout of :func:`method_signals` flattened."""
    names = []
    for m in methods:
        steps = ["gen"] if m.generation else [f"t{t}" for t in m.timesteps]
        names += [f"{m.name}/{s}/{st}" for st in steps for s in SIGNALS]
    return names


def balanced_subsets(is_member, n_subsets: int = 100, per_class: int = 500, seed: int = 0) -> list[np.ndarray]:
    """The LAION-mi evaluation protocol (§4.7): ``n_subsets`` random subsets, each of
    ``per_class`` members and ``per_class`` non-members drawn without replacement from the
    attack set. Returns sorted position arrays into ``is_member``."""
    y = np.asarray(is_member).astype(bool).reshape(-1)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if per_class > min(len(pos), len(neg)):
        raise ValueError(f"subsets of {per_class} members + {per_class} non-members need that many of each; the attack set has {len(pos)} members and {len(neg)} non-members.")
    rng = np.random.default_rng(seed)
    return [np.sort(np.concatenate([rng.choice(pos, per_class, replace=False), rng.choice(neg, per_class, replace=False)]))
            for _ in range(n_subsets)]
