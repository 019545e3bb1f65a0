"""Per-user output transformations of B4B (thesis §6.3.3, App. A.3) against sybil pooling.

Every user U gets a map T_U drawn at random, but reproducibly: its parameters come from a
generator seeded by HMAC-SHA256(server secret, user id), so the map survives restarts without
being stored, and nobody without the secret can recompute it from the id.

Parameter distributions (the thesis leaves them open; these are rsgm's choices):

* ``affine``:  r -> A r + b with A = Q diag(s), Q a Haar-random orthogonal matrix and
  s_i ~ LogUniform[1/2, 2], so the condition number of A is at most 4 (a linear probe loses
  nothing, yet every coordinate mixes all others); b_i ~ N(0, shift_std^2).
* ``pad``:     append ceil(ratio * d) constants drawn from N(0, 1) (ratio 0.25).
* ``add``:     insert ceil(ratio * d) constants from N(0, 1) at user-specific random positions.
* ``shuffle``: a user-specific random permutation of the coordinates.
* ``binary``:  bits [w_j . r > 0] for code_ratio * d Gaussian hyperplanes through the origin
  (code_ratio 2, as in the authors' code); outputs are 0/1 floats.

Compositions are written with ``+`` and applied left to right, e.g. ``affine+pad+shuffle``.
``none`` is the identity.
"""
from __future__ import annotations

import hashlib
import hmac
import math

import torch

TRANSFORM_KINDS = ("affine", "pad", "add", "shuffle", "binary")


def derive_seed(secret: bytes, user_id: str, purpose: str) -> int:
    """63-bit seed = first 8 bytes of HMAC-SHA256(secret, purpose || 0 || user_id)."""
    if not secret:
        raise ValueError("the B4B server secret is empty; set a secret (at least 16 random bytes)")
    mac = hmac.new(secret, purpose.encode() + b"\0" + user_id.encode(), hashlib.sha256).digest()
    return int.from_bytes(mac[:8], "little") >> 1


class UserTransform:
    """One per-user map; ``__call__`` takes [n, in_dim] and returns [n, out_dim]."""

    def __init__(self, kind: str, in_dim: int, generator: torch.Generator, shift_std: float = 1.0,
                 pad_ratio: float = 0.25, code_ratio: float = 2.0):
        self.kind, self.in_dim = kind, in_dim
        g = generator
        if kind == "affine":
            q, rr = torch.linalg.qr(torch.randn(in_dim, in_dim, generator=g, dtype=torch.float64))
            q = q * torch.sign(torch.diagonal(rr))  # sign fix makes Q Haar distributed
            scale = torch.exp(torch.empty(in_dim, dtype=torch.float64).uniform_(-math.log(2), math.log(2), generator=g))
            self.matrix = (q * scale).float()  # A = Q diag(s)
            self.shift = (shift_std * torch.randn(in_dim, generator=g, dtype=torch.float64)).float()
            self.out_dim = in_dim
        elif kind in ("pad", "add"):
            n_extra = math.ceil(pad_ratio * in_dim)
            self.values = torch.randn(n_extra, generator=g, dtype=torch.float64).float()
            self.out_dim = in_dim + n_extra
            if kind == "add":
                slots = torch.randperm(self.out_dim, generator=g)
                self.const_pos, _ = torch.sort(slots[:n_extra])
                self.data_pos, _ = torch.sort(slots[n_extra:])
        elif kind == "shuffle":
            self.perm = torch.randperm(in_dim, generator=g)
            self.out_dim = in_dim
        elif kind == "binary":
            self.out_dim = max(1, round(code_ratio * in_dim))
            self.planes = torch.randn(in_dim, self.out_dim, generator=g, dtype=torch.float64).float()
        else:
            raise ValueError(f"unknown transform {kind!r}; use one of {TRANSFORM_KINDS} joined by '+', or 'none'")

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        if r.ndim != 2 or r.shape[1] != self.in_dim:
            raise ValueError(f"transform {self.kind} expects [n, {self.in_dim}], got {tuple(r.shape)}")
        dev, dt = r.device, r.dtype
        if self.kind == "affine":
            return r @ self.matrix.to(dev, dt).T + self.shift.to(dev, dt)
        if self.kind == "pad":
            return torch.cat([r, self.values.to(dev, dt).expand(r.shape[0], -1)], dim=1)
        if self.kind == "add":
            out = torch.empty(r.shape[0], self.out_dim, device=dev, dtype=dt)
            out[:, self.const_pos.to(dev)] = self.values.to(dev, dt)
            out[:, self.data_pos.to(dev)] = r
            return out
        if self.kind == "shuffle":
            return r[:, self.perm.to(dev)]
        return (r @ self.planes.to(dev, dt) > 0).to(dt)


class ComposedTransform:
    """T = T_k o ... o T_1 for a spec ``"t1+...+tk"``; ``"none"`` is the identity."""

    def __init__(self, parts: list[UserTransform], in_dim: int):
        self.parts, self.in_dim = parts, in_dim
        self.out_dim = parts[-1].out_dim if parts else in_dim

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        for t in self.parts:
            r = t(r)
        return r


def parse_transform_spec(spec: str) -> list[str]:
    """``"affine+pad+shuffle"`` -> ``["affine", "pad", "shuffle"]``; ``"none"`` -> ``[]``."""
    kinds = [] if spec.strip().lower() in ("", "none", "identity") else [k.strip().lower() for k in spec.split("+")]
    for k in kinds:
        if k not in TRANSFORM_KINDS:
            raise ValueError(f"unknown transform {k!r} in {spec!r}; use one of {TRANSFORM_KINDS} joined by '+', or 'none'")
    return kinds


def make_user_transform(spec: str, dim: int, secret: bytes, user_id: str, **kwargs) -> ComposedTransform:
    """The transform of ``user_id``: each part seeded by HMAC(secret, position:kind, user_id)."""
    parts, d = [], dim
    for i, kind in enumerate(parse_transform_spec(spec)):
        g = torch.Generator().manual_seed(derive_seed(secret, user_id, f"transform:{i}:{kind}"))
        t = UserTransform(kind, d, g, **kwargs)
        parts.append(t)
        d = t.out_dim
    return ComposedTransform(parts, dim)
