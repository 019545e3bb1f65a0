"""The B4B response pipeline for one batch of one user (thesis §6.3, Fig. 6.3.1).

    1. hash the clean representations r with the global LSH and mark the buckets in the
       user's persistent state (one transaction per batch);
    2. sigma = cost(coverage after this batch)         (eq. 6.1, or a constant for static noise);
    3. r~ = r + sigma * N(0, I);
    4. return T_U(r~), the user's secret transform.

The coverage is always tracked, also when the noise is static or off, so the baselines log
the same quantities.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch

from rsgm.defenses.cost import add_gaussian_noise, b4b_sigma
from rsgm.defenses.lsh import LSHCoverage
from rsgm.defenses.store import UserStateStore
from rsgm.defenses.transforms import ComposedTransform, make_user_transform

NOISE_MODES = ("coverage", "static")
# eq. 6.1 overflows float32 for small beta; far below this cap the answer is pure noise anyway.
SIGMA_CAP = 1e30


def load_or_create_secret(path: str | os.PathLike) -> bytes:
    """Read the server secret; create 32 random bytes (mode 0600) the first time."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} for the B4B secret file does not exist; create it or change secret_file")
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    data = path.read_bytes()
    if len(data) < 16:
        raise ValueError(f"B4B secret file {path} holds {len(data)} bytes; it needs at least 16 random bytes")
    return data


@dataclass(frozen=True)
class Response:
    representation: torch.Tensor
    coverage: float
    sigma: float
    n_queries: int


class B4BDefense:
    """Per-user coverage tracking, noise and transformation around an encoder's outputs.

    Args:
        dim: size of the clean representation.
        state_path: SQLite file of the user states (created if absent).
        secret: server secret from which the per-user transforms are derived.
        noise: ``"coverage"`` (B4B, eq. 6.1) or ``"static"`` (the same ``static_sigma`` for all).
        lam, alpha, beta: cost-function parameters (coverage as a fraction).
        static_sigma: noise level when ``noise="static"``.
        transform: per-user transform spec, e.g. ``"affine"``, ``"pad+shuffle"``, ``"none"``.
        n_proj, n_bits, lsh_seed: the global LSH (20 x 12 bits by default).
        noise_seed: seed of the noise generator (None: fresh OS entropy, as a server should use).
    """

    def __init__(self, dim: int, state_path: str | os.PathLike, secret: bytes, noise: str = "coverage",
                 lam: float = 1e-6, alpha: float = 1.0, beta: float = 0.8, static_sigma: float = 0.0,
                 transform: str = "affine", n_proj: int = 20, n_bits: int = 12, lsh_seed: int = 0,
                 noise_seed: int | None = None):
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        if static_sigma < 0:
            raise ValueError(f"static_sigma must be >= 0, got {static_sigma}")
        b4b_sigma(0.0, lam, alpha, beta)  # validates the cost parameters once, up front
        self.dim, self.noise, self.transform_spec = dim, noise, transform
        self.lam, self.alpha, self.beta, self.static_sigma = lam, alpha, beta, static_sigma
        self.secret = secret
        self.lsh = LSHCoverage(dim, n_proj, n_bits, lsh_seed)
        self.store = UserStateStore(state_path, self.lsh)
        seed = noise_seed if noise_seed is not None else int.from_bytes(secrets.token_bytes(8), "little") >> 1
        self.generator = torch.Generator().manual_seed(seed)
        self._transforms: dict[str, ComposedTransform] = {}
        self.out_dim = self.transform_for("__dim_probe__").out_dim

    def transform_for(self, user_id: str) -> ComposedTransform:
        t = self._transforms.get(user_id)
        if t is None:
            t = make_user_transform(self.transform_spec, self.dim, self.secret, user_id)
            self._transforms[user_id] = t
        return t

    def sigma_for(self, coverage: float) -> float:
        if self.noise == "static":
            return self.static_sigma
        return min(SIGMA_CAP, b4b_sigma(coverage, self.lam, self.alpha, self.beta))

    @torch.no_grad()
    def respond(self, user_id: str, r: torch.Tensor) -> Response:
        """Defended answer to one batch ``r`` [n, dim] of clean representations of ``user_id``."""
        if not isinstance(user_id, str) or not user_id:
            raise ValueError("user_id must be a non-empty string")
        if r.ndim != 2 or r.shape[1] != self.dim or r.shape[0] == 0:
            raise ValueError(f"representations must have shape [n >= 1, {self.dim}], got {tuple(r.shape)}")
        if not torch.isfinite(r).all():
            raise ValueError("representations contain NaN or inf; check the encoder and its input")
        state = self.store.record(user_id, self.lsh.bucket_ids(r))
        sigma = self.sigma_for(state.coverage)
        out = self.transform_for(user_id)(add_gaussian_noise(r, sigma, self.generator))
        return Response(out, state.coverage, sigma, state.n_queries)
