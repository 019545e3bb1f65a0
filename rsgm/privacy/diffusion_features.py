"""Membership features of a diffusion model for CDI (methods_spec §5.3), batched.

All raw features are "lower = member"; the scoring model learns the sign. Notation:
abar_t = alphas_cumprod[t], z = encode(x), y = the condition, f = the target's eps
prediction, ||.||^2 = sum of squares over C, H, W.

=========  ======  =========================================================================
name       access  definition
=========  ======  =========================================================================
dl         gray    (1/R) sum_r ||eps_r - f(sqrt(abar_t) z + sqrt(1-abar_t) eps_r, t)||^2, t=100, R=5
secmi      gray    DDIM-invert z from 0 to t in steps of delta (z~_t), one more step up, one
                   step down (z^_t): ||z^_t - z~_t||^2, t=100, delta=10
pia        gray    eps0 = f(z, 0); ||eps0 - f(sqrt(abar_t) z + sqrt(1-abar_t) eps0, t)||_p, t=200,
                   p=5 (App. C.3.1 prints ||.||_5; the authors' configuration also uses 5)
pian       gray    pia with eps0 -> C H W sqrt(pi/2) eps0 / ||eps0||_1
gm_t{t}    white   g = |grad_{z_t} ||eps - f(z_t, t)||^2|, M = top 20 % of g per sample,
                   z^ = eps' M + z_t (1-M):  ||(eps' - z_t) M - f(z^, t) M||^2, t = 0..900
ml_t{t}    gray    the denoising loss at t = 0, 100, ..., 900 (``ml_draws`` noise draws each)
no_loss    white   min_delta ||eps - f(z_t + delta, t)||^2 after ``no_steps`` L-BFGS iterations
no_delta   white   ||delta*||^2 of that solution; t = 100
clid_t{t}  gray    CLiD (App. C.8.1, conditional models only): with one eps per (sample, t),
                   ||eps - f(z_t, t, y)||^2 - ||eps - f(z_t, t, null)||^2, t = 0..900; the
                   conditional minus the unconditional denoising loss (lower = member)
=========  ======  =========================================================================

DDIM move from level s to level s' (§0.3): z_s' = sqrt(abar_s') x0 + sqrt(1-abar_s') e with
e = f(z_s, s) and x0 = (z_s - sqrt(1-abar_s) e) / sqrt(abar_s).

Batching: every feature stacks its timesteps and noise draws into one batch of network
calls (split into chunks of ``max_batch`` rows); only SecMI's inversion is sequential by
definition. Noise is drawn per sample from a generator seeded by (seed, feature, sample
index), so a sample's features do not depend on its batch, its rank or the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from rsgm.errors import RSGMError

ACCESS = {"dl": "gray", "secmi": "gray", "pia": "gray", "pian": "gray", "ml": "gray", "gm": "white", "no": "white", "clid": "gray"}
_STREAM = {"dl": 1, "gm": 2, "ml": 3, "no": 4, "gm_prime": 5, "clid": 6}


def sample_noise(index: Tensor, shape: tuple[int, ...], seed: int, stream: int, device=None, dtype=None) -> Tensor:
    """(len(index), *shape) standard normals; row i depends only on (seed, stream, index[i])."""
    rows = []
    for i in index.reshape(-1).tolist():
        state = np.random.SeedSequence([seed, stream, int(i)]).generate_state(1, dtype=np.uint64)[0]
        g = torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))
        rows.append(torch.randn(shape, generator=g))
    return torch.stack(rows).to(device=device, dtype=dtype)


def _repeat_cond(cond, times: int):
    if cond is None:
        return None
    return cond.repeat(times, *([1] * (cond.ndim - 1)))


def _expand(t, ref: Tensor) -> Tensor:
    return t.view(-1, *([1] * (ref.ndim - 1)))


@dataclass
class FeatureConfig:
    """Which features to compute and their parameters (defaults follow the spec)."""

    features: list[str] = field(default_factory=lambda: ["dl", "secmi", "pia", "pian", "gm", "ml", "no"])
    dl_t: int = 100
    dl_draws: int = 5
    secmi_t: int = 100
    secmi_delta: int = 10
    pia_t: int = 200
    pia_p: float = 5.0
    gm_timesteps: list[int] = field(default_factory=lambda: list(range(0, 1000, 100)))
    gm_top_fraction: float = 0.2
    gm_fresh_noise: bool = False
    ml_timesteps: list[int] = field(default_factory=lambda: list(range(0, 1000, 100)))
    ml_draws: int = 1
    no_t: int = 100
    no_steps: int = 5
    no_lr: float = 1.0
    no_history: int = 100
    clid_timesteps: list[int] = field(default_factory=lambda: list(range(0, 1000, 100)))
    clid_draws: int = 1
    seed: int = 0
    max_batch: int = 1024

    def __post_init__(self) -> None:
        unknown = set(self.features) - set(ACCESS)
        if unknown:
            raise ValueError(f"unknown diffusion features {sorted(unknown)}; choose from {sorted(ACCESS)}.")
        if not self.features:
            raise ValueError("select at least one diffusion feature.")
        if self.pia_p <= 0:
            raise ValueError(f"pia_p must be positive (the order of the PIA norm), got {self.pia_p}.")


def feature_names(cfg: FeatureConfig) -> list[str]:
    names = []
    for f in cfg.features:
        if f == "gm":
            names += [f"gm_t{t}" for t in cfg.gm_timesteps]
        elif f == "ml":
            names += [f"ml_t{t}" for t in cfg.ml_timesteps]
        elif f == "clid":
            names += [f"clid_t{t}" for t in cfg.clid_timesteps]
        elif f == "no":
            names += ["no_loss", "no_delta"]
        else:
            names.append(f)
    return names


def feature_group(name: str) -> str:
    """'gm_t300' -> 'gm', 'no_delta' -> 'no', 'dl' -> 'dl'."""
    return name.split("_")[0]


class CountingEps:
    """Calls ``target.eps`` in chunks of ``max_batch`` rows and counts rows per sample."""

    def __init__(self, target, max_batch: int) -> None:
        self.target, self.max_batch = target, max_batch
        self.rows = 0

    def __call__(self, z_t: Tensor, t: Tensor, cond) -> Tensor:
        self.rows += z_t.shape[0]
        outs = []
        for s in range(0, z_t.shape[0], self.max_batch):
            sl = slice(s, s + self.max_batch)
            c = None if cond is None else cond[sl]
            outs.append(self.target.eps(z_t[sl], t[sl], c))
        return torch.cat(outs)


def _noised(ab: Tensor, t: Tensor, z: Tensor, eps: Tensor) -> Tensor:
    a = _expand(ab[t], z)
    return a.sqrt() * z + (1 - a).sqrt() * eps


def _plain(*tensors):
    """Copies usable by autograd: Lightning's test loop runs under inference mode, whose
    tensors cannot enter a graph. Call inside ``torch.inference_mode(False)``."""
    return tuple(t.clone() if isinstance(t, Tensor) else t for t in tensors)


def _sqnorm(v: Tensor) -> Tensor:
    return v.flatten(1).pow(2).sum(1)


def _multi_timestep_loss(f: CountingEps, ab: Tensor, z: Tensor, cond, timesteps: list[int], eps: Tensor) -> Tensor:
    """Denoising loss for every (timestep, draw) in one batched call. eps: (R, B, ...) with
    R = len(timesteps) * draws laid out timestep-major. Returns (R, B)."""
    R, B = eps.shape[:2]
    per_t = R // len(timesteps)
    t = torch.tensor(timesteps, device=z.device).repeat_interleave(per_t * B)
    zr = z.repeat(R, *([1] * (z.ndim - 1)))
    epsr = eps.reshape(R * B, *z.shape[1:])
    pred = f(_noised(ab, t, zr, epsr), t, _repeat_cond(cond, R))
    return _sqnorm(epsr - pred).view(R, B)


def denoising_loss(f, ab, z, cond, index, cfg: FeatureConfig) -> Tensor:
    eps = sample_noise(index, (cfg.dl_draws, *z.shape[1:]), cfg.seed, _STREAM["dl"], z.device, z.dtype).transpose(0, 1)
    return _multi_timestep_loss(f, ab, z, cond, [cfg.dl_t], eps).mean(0).unsqueeze(1)


def multiple_loss(f, ab, z, cond, index, cfg: FeatureConfig) -> Tensor:
    n = len(cfg.ml_timesteps) * cfg.ml_draws
    eps = sample_noise(index, (n, *z.shape[1:]), cfg.seed, _STREAM["ml"], z.device, z.dtype).transpose(0, 1)
    loss = _multi_timestep_loss(f, ab, z, cond, cfg.ml_timesteps, eps)
    return loss.view(len(cfg.ml_timesteps), cfg.ml_draws, -1).mean(1).T


def clid(f, ab, z, cond, null, index, cfg: FeatureConfig) -> Tensor:
    """CLiD per timestep: conditional minus unconditional denoising loss on the same noised
    input (one eps per sample, timestep and draw; both calls in one batch). Returns (B, T)."""
    if null is None or cond is None:
        raise RSGMError("the CLiD feature needs a conditional target (a condition and a null condition, as in "
                        "classifier-free guidance); drop 'clid' from model.features for an unconditional model.")
    T, R, B = len(cfg.clid_timesteps), cfg.clid_draws, z.shape[0]
    eps = sample_noise(index, (T * R, *z.shape[1:]), cfg.seed, _STREAM["clid"], z.device, z.dtype).transpose(0, 1)
    both = _multi_timestep_loss(f, ab, torch.cat([z, z]), torch.cat([cond, null]), cfg.clid_timesteps, torch.cat([eps, eps], 1))
    return (both[:, :B] - both[:, B:]).view(T, R, B).mean(1).T


def ddim_move(ab: Tensor, z_s: Tensor, s: int, s_next: int, e: Tensor) -> Tensor:
    a_s, a_n = ab[s], ab[s_next]
    x0 = (z_s - (1 - a_s).sqrt() * e) / a_s.sqrt()
    return a_n.sqrt() * x0 + (1 - a_n).sqrt() * e


def secmi_stat(f, ab, z, cond, index, cfg: FeatureConfig) -> Tensor:
    B, dev = z.shape[0], z.device
    if cfg.secmi_t % cfg.secmi_delta:
        raise ValueError(f"secmi_t ({cfg.secmi_t}) must be a multiple of secmi_delta ({cfg.secmi_delta}).")
    tt = lambda s: torch.full((B,), s, dtype=torch.long, device=dev)  # noqa: E731
    zs = z
    for s in range(0, cfg.secmi_t, cfg.secmi_delta):
        zs = ddim_move(ab, zs, s, s + cfg.secmi_delta, f(zs, tt(s), cond))
    t, d = cfg.secmi_t, cfg.secmi_delta
    z_up = ddim_move(ab, zs, t, t + d, f(zs, tt(t), cond))
    z_back = ddim_move(ab, z_up, t + d, t, f(z_up, tt(t + d), cond))
    return _sqnorm(z_back - zs).unsqueeze(1)


def _lp(v: Tensor, p: float) -> Tensor:
    return v.flatten(1).abs().pow(p).sum(1).pow(1.0 / p)


def pia_features(f, ab, z, cond, cfg: FeatureConfig, which: list[str]) -> Tensor:
    """PIA and/or PIAN, sharing the eps0 = f(z, 0) call and batching both t-calls together."""
    B, dev = z.shape[0], z.device
    eps0 = f(z, torch.zeros(B, dtype=torch.long, device=dev), cond)
    starts = []
    for name in which:
        if name == "pia":
            starts.append(eps0)
        else:
            chw = eps0[0].numel()
            starts.append(chw * math.sqrt(math.pi / 2) * eps0 / eps0.flatten(1).abs().sum(1).view(-1, *([1] * (z.ndim - 1))))
    e = torch.cat(starts)
    t = torch.full((e.shape[0],), cfg.pia_t, dtype=torch.long, device=dev)
    zr = z.repeat(len(which), *([1] * (z.ndim - 1)))
    pred = f(_noised(ab, t, zr, e), t, _repeat_cond(cond, len(which)))
    return _lp(e - pred, cfg.pia_p).view(len(which), B).T


def gradient_masking(f, ab, z, cond, index, cfg: FeatureConfig) -> Tensor:
    T, B = len(cfg.gm_timesteps), z.shape[0]
    shape = z.shape[1:]
    eps = sample_noise(index, (T, *shape), cfg.seed, _STREAM["gm"], z.device, z.dtype).transpose(0, 1).reshape(T * B, *shape)
    if cfg.gm_fresh_noise:
        eps_p = sample_noise(index, (T, *shape), cfg.seed, _STREAM["gm_prime"], z.device, z.dtype).transpose(0, 1).reshape(T * B, *shape)
    else:
        eps_p = eps  # the thesis writes the same symbol for both draws
    t = torch.tensor(cfg.gm_timesteps, device=z.device).repeat_interleave(B)
    cond_r = _repeat_cond(cond, T)
    with torch.inference_mode(False), torch.enable_grad():
        zr, eps_g, t_g, c_g, ab_g = _plain(z.repeat(T, *([1] * (z.ndim - 1))), eps, t, cond_r, ab)
        z_t = _noised(ab_g, t_g, zr, eps_g).detach().requires_grad_(True)
        # Per-sample losses are independent (no batch-coupled layers in eval mode), so the
        # gradient of their sum is each sample's own gradient.
        loss = _sqnorm(eps_g - f(z_t, t_g, c_g)).sum()
        (g,) = torch.autograd.grad(loss, z_t)
    g, z_t = g.abs().flatten(1), z_t.detach()
    k = max(1, int(round(cfg.gm_top_fraction * g.shape[1])))
    mask = torch.zeros_like(g).scatter_(1, g.topk(k, dim=1).indices, 1.0).view_as(z_t)
    z_hat = eps_p * mask + z_t * (1 - mask)
    with torch.no_grad():
        pred = f(z_hat, t, cond_r)
    return _sqnorm((eps_p - z_t) * mask - pred * mask).view(T, B).T


def batched_lbfgs(closure, x0: Tensor, max_iter: int = 5, lr: float = 1.0, history_size: int = 100,
                  tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9) -> Tensor:
    """``torch.optim.LBFGS`` (no line search, one ``step`` with ``max_iter`` iterations) run
    independently for every row of ``x0`` (B, D) at once: each row keeps its own history,
    step length and stopping state. ``closure(x) -> (loss (B,), grad (B, D))``."""
    B = x0.shape[0]
    x = x0.clone()
    loss, g = closure(x)
    active = g.abs().amax(1) > tolerance_grad
    dirs: list[Tensor] = []  # y_i, (B, D); stored per row via masks
    stps: list[Tensor] = []
    ros: list[Tensor] = []
    valid: list[Tensor] = []  # (B,) bool: whether row b stored this pair
    H_diag = torch.ones(B, dtype=x.dtype, device=x.device)
    d = -g
    t = torch.zeros(B, dtype=x.dtype, device=x.device)
    prev_g = g.clone()
    dot = lambda a, b: (a * b).sum(1)  # noqa: E731
    for n_iter in range(1, max_iter + 1):
        if n_iter > 1:
            y, s = g - prev_g, d * t.unsqueeze(1)
            ys = dot(y, s)
            add = active & (ys > 1e-10)
            # Per-row history: append the pair where accepted, keep each row's last history_size.
            dirs.append(y), stps.append(s), ros.append(torch.where(add, 1.0 / ys.clamp_min(1e-300), 0.0)), valid.append(add)
            H_diag = torch.where(add, ys / dot(y, y).clamp_min(1e-300), H_diag)
            counts = torch.zeros(B, dtype=torch.long, device=x.device)
            keep = []
            for v in reversed(valid):
                keep.append(v & (counts < history_size))
                counts += v.long()
            keep = keep[::-1]
            q = -g
            al = [None] * len(dirs)
            for i in range(len(dirs) - 1, -1, -1):
                al[i] = torch.where(keep[i], dot(stps[i], q) * ros[i], 0.0)
                q = q - al[i].unsqueeze(1) * dirs[i]
            r = q * H_diag.unsqueeze(1)
            for i in range(len(dirs)):
                be = torch.where(keep[i], dot(dirs[i], r) * ros[i], 0.0)
                r = r + (al[i] - be).unsqueeze(1) * stps[i]
            d = torch.where(active.unsqueeze(1), r, d)
        prev_g = g.clone()
        prev_loss = loss.clone()
        if n_iter == 1:
            t = torch.clamp(1.0 / g.abs().sum(1), max=1.0) * lr
        else:
            t = torch.full_like(t, lr)
        gtd = dot(g, d)
        active = active & (gtd <= -tolerance_change)
        x = x + torch.where(active, t, 0.0).unsqueeze(1) * d
        if n_iter == max_iter:
            break
        new_loss, new_g = closure(x)
        loss = torch.where(active, new_loss, loss)
        g = torch.where(active.unsqueeze(1), new_g, g)
        opt_cond = g.abs().amax(1) <= tolerance_grad
        small_step = (d * t.unsqueeze(1)).abs().amax(1) <= tolerance_change
        flat = (loss - prev_loss).abs() < tolerance_change
        active = active & ~opt_cond & ~small_step & ~flat
        if not active.any():
            break
    return x


def noise_optimisation(f, ab, z, cond, index, cfg: FeatureConfig) -> Tensor:
    B = z.shape[0]
    eps = sample_noise(index, tuple(z.shape[1:]), cfg.seed, _STREAM["no"], z.device, z.dtype)
    t = torch.full((B,), cfg.no_t, dtype=torch.long, device=z.device)
    z_t = _noised(ab, t, z, eps).detach()

    def closure(delta_flat: Tensor):
        with torch.inference_mode(False), torch.enable_grad():
            d_g, eps_g, z_g, t_g, c_g = _plain(delta_flat, eps, z_t, t, cond)
            delta = d_g.view_as(z_g).requires_grad_(True)
            loss = _sqnorm(eps_g - f(z_g + delta, t_g, c_g))
            (g,) = torch.autograd.grad(loss.sum(), delta)
        return loss.detach(), g.flatten(1)

    with torch.inference_mode(False):
        delta = batched_lbfgs(closure, torch.zeros(B, z[0].numel(), dtype=z.dtype, device=z.device),
                              max_iter=cfg.no_steps, lr=cfg.no_lr, history_size=cfg.no_history)
    with torch.no_grad():
        final = _sqnorm(eps - f(z_t + delta.view_as(z_t), t, cond))
    return torch.stack([final, delta.pow(2).sum(1)], 1)


class DiffusionFeatureExtractor:
    """Computes the configured features of a batch: (B, k) rows, columns in :func:`feature_names` order.

    ``rows_per_sample`` records, per feature group, how many network rows (eps evaluations,
    forward passes inside gradient computations included) each sample cost.
    """

    def __init__(self, cfg: FeatureConfig | None = None) -> None:
        self.cfg = cfg or FeatureConfig()
        self.names = feature_names(self.cfg)
        self.rows_per_sample: dict[str, float] = {}

    @torch.no_grad()
    def __call__(self, target, x: Tensor, cond, index: Tensor) -> Tensor:
        cfg = self.cfg
        z = target.encode(x)
        y = target.encode_cond(cond)
        ab = target.alphas_cumprod.to(z.device, z.dtype)
        B = z.shape[0]
        cols: dict[str, Tensor] = {}
        pia_like = [n for n in cfg.features if n in ("pia", "pian")]
        for name in cfg.features:
            f = CountingEps(target, cfg.max_batch)
            if name == "dl":
                cols[name] = denoising_loss(f, ab, z, y, index, cfg)
            elif name == "secmi":
                cols[name] = secmi_stat(f, ab, z, y, index, cfg)
            elif name in ("pia", "pian"):
                if name != pia_like[0]:
                    continue
                out = pia_features(f, ab, z, y, cfg, pia_like)
                for j, n in enumerate(pia_like):
                    cols[n] = out[:, j: j + 1]
                    self.rows_per_sample[n] = f.rows / B / len(pia_like)
                continue
            elif name == "gm":
                cols[name] = gradient_masking(f, ab, z, y, index, cfg)
            elif name == "ml":
                cols[name] = multiple_loss(f, ab, z, y, index, cfg)
            elif name == "no":
                cols[name] = noise_optimisation(f, ab, z, y, index, cfg)
            elif name == "clid":
                null = target.null_cond(B)
                cols[name] = clid(f, ab, z, y, None if null is None else target.encode_cond(null), index, cfg)
            self.rows_per_sample[name] = f.rows / B
        return torch.cat([cols[n] for n in cfg.features], 1)


def minimum_rows_per_sample(cfg: FeatureConfig) -> dict[str, int]:
    """Network evaluations per sample that each definition needs at the least (forward passes;
    the gradient features also need that many backward passes through the network)."""
    return {
        "dl": cfg.dl_draws,
        "secmi": cfg.secmi_t // cfg.secmi_delta + 2,
        "pia": 2,
        "pian": 2,
        "gm": 2 * len(cfg.gm_timesteps),
        "ml": len(cfg.ml_timesteps) * cfg.ml_draws,
        "no": cfg.no_steps + 1,
        "clid": 2 * len(cfg.clid_timesteps) * cfg.clid_draws,
    }
