"""The B4B response pipeline for one batch of one user (thesis §6.3, Fig. 6.3.1).

    1. hash the clean representations r with the global LSH; in one store transaction mark the
       buckets, compute sigma = cost(coverage after this batch) (eq. 6.1, or a constant for
       static noise), check it, and only then commit (a failing request is never charged);
    2. r~ = r + sigma * z(r), z the keyed noise of rsgm.defenses.noise (same cell, same noise);
    3. return T_U(r~), the user's secret transform (LRU-cached, re-derived from the secret).

The coverage is always tracked, also when the noise is static or off, so the baselines log
the same quantities.
"""
from __future__ import annotations

import os
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from rsgm.defenses.config import DefenseConfig
from rsgm.defenses.cost import b4b_sigma
from rsgm.defenses.lsh import LSHCoverage
from rsgm.defenses.noise import KeyedNoise
from rsgm.defenses.store import StateStore, open_store
from rsgm.defenses.transforms import ComposedTransform, make_user_transform


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
    """Per-user coverage tracking, keyed noise and transformation around an encoder's outputs.

    Args:
        dim: size of the clean representation.
        state: state store URL or SQLite path (see ``rsgm.defenses.store.open_store``).
        secret: server secret from which transforms and noise derive.
        config: a :class:`DefenseConfig`; keyword arguments override its fields.
    """

    def __init__(self, dim: int, state: str | os.PathLike, secret: bytes, config: DefenseConfig | None = None, **overrides):
        cfg = (config or DefenseConfig()).replace(**overrides) if overrides else (config or DefenseConfig())
        self.cfg, self.dim, self.secret = cfg, dim, secret
        self.lsh = LSHCoverage(dim, cfg.n_proj, cfg.n_bits, cfg.lsh_seed, cfg.lsh_precision)
        self.store: StateStore = open_store(state, self.lsh)
        self.noise = KeyedNoise(secret, dim, cfg.noise_table_rows)
        self._transforms: OrderedDict[str, ComposedTransform] = OrderedDict()
        self.out_dim = make_user_transform(cfg.transform, dim, secret, "__dim_probe__").out_dim

    def transform_for(self, user_id: str) -> ComposedTransform:
        """The user's transform from a bounded LRU cache (re-derived from the secret on a miss)."""
        t = self._transforms.get(user_id)
        if t is None:
            t = make_user_transform(self.cfg.transform, self.dim, self.secret, user_id)
            self._transforms[user_id] = t
            if len(self._transforms) > self.cfg.cache_size:
                self._transforms.popitem(last=False)
        else:
            self._transforms.move_to_end(user_id)
        return t

    def sigma_for(self, coverage: float) -> float:
        if self.cfg.noise == "static":
            return self.cfg.static_sigma
        return b4b_sigma(coverage, self.cfg.lam, self.cfg.alpha, self.cfg.beta)

    def check(self, user_id: str, r: torch.Tensor) -> None:
        if not isinstance(user_id, str) or not user_id:
            raise ValueError("user_id must be a non-empty string")
        if r.ndim != 2 or r.shape[1] != self.dim or r.shape[0] == 0:
            raise ValueError(f"representations must have shape [n >= 1, {self.dim}], got {tuple(r.shape)}")
        if not torch.isfinite(r).all():
            raise ValueError("representations contain NaN or inf; check the encoder and its input")

    @torch.no_grad()
    def respond(self, user_id: str, r: torch.Tensor) -> Response:
        """Defended answer to one batch ``r`` [n, dim] of clean representations of ``user_id``."""
        self.check(user_id, r)
        ids = self.lsh.bucket_ids(r)
        charge = self.store.record(user_id, ids, self.sigma_for)
        st, sigma = charge.state, charge.sigma
        noisy = r.float().cpu()
        if sigma > 0:
            noisy = noisy + sigma * self.noise(user_id, st.occupied, ids)
        out = self.transform_for(user_id)(noisy).to(r.device)
        return Response(out, st.coverage, sigma, st.n_queries)
