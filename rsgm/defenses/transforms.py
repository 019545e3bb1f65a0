"""Per-user output transformations of B4B (thesis §6.3.3, App. A.3) against sybil pooling.

Every user U gets a map T_U drawn at random, but reproducibly: its parameters come from a
generator seeded by HMAC-SHA256(server secret, user id), so the map survives restarts without
being stored, and nobody without the secret can recompute it from the id.

Parameter distributions (the thesis leaves them open; these are rsgm's choices):

* ``affine``:  r -> A r + b with A = Q diag(s), s_i ~ LogUniform[1/2, 2] (condition number of
  A at most 4, so a linear probe loses nothing) and b_i ~ N(0, shift_std^2).  Q is a
  *structured* random orthogonal map, Q = D3 P2 H D2 P1 H D1: D random signs, P random
  permutations, H the normalised Walsh-Hadamard transform on the power-of-two blocks of d
  (d = 2^a + 2^b + ...).  Two Hadamard rounds with permutations in between mix every output
  coordinate with (nearly) all inputs.  Creating it draws O(d) numbers (no QR), it is stored in
  O(d) memory and applied in O(d log d) per answer.
* ``pad``:     append ceil(ratio * d) constants drawn from N(0, 1) (ratio 0.25).
* ``add``:     insert ceil(ratio * d) constants from N(0, 1) at user-specific random positions.
* ``shuffle``: a user-specific random permutation of the coordinates.
* ``binary``:  bits [q_j . r > 0] for code_ratio * d hyperplanes through the origin, the rows of
  ceil(code_ratio) independent structured orthogonal maps (code_ratio 2, as in the authors'
  code); outputs are 0/1 floats.

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


def _blocks(d: int) -> list[int]:
    """Power-of-two block sizes summing to d, largest first (d = 2^a + 2^b + ...)."""
    return [1 << k for k in range(d.bit_length() - 1, -1, -1) if d >> k & 1]


_HADAMARD: dict[int, torch.Tensor] = {}


def _hadamard(m: int) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix of size m (a power of two <= 64), cached."""
    h = _HADAMARD.get(m)
    if h is None:
        h = torch.ones(1, 1)
        while h.shape[0] < m:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        h = _HADAMARD[m] = h / m ** 0.5
    return h


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform of the rows of x [n, m], m = 2^k.

    H_m = H_a (x) H_b (x) ... with factors of at most 64, applied axis by axis as small matmuls
    (2 n m (a + b + ...) flops instead of 2 n m^2)."""
    n, m = x.shape
    k = m.bit_length() - 1
    sizes = [1 << min(6, k - i) for i in range(0, k, 6)] or [1]
    y = x.reshape(n, *sizes)
    for axis, f in enumerate(sizes, start=1):
        if f > 1:
            y = (y.movedim(axis, -1) @ _hadamard(f).to(x.device, x.dtype)).movedim(-1, axis)
    return y.reshape(n, m)


def fwht_blocks(x: torch.Tensor, blocks: list[int]) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform applied to each column block of x [n, d]."""
    if len(blocks) == 1:
        return _fwht(x)
    outs, start = [], 0
    for m in blocks:
        outs.append(_fwht(x[:, start:start + m]))
        start += m
    return torch.cat(outs, dim=1)


class StructuredOrthogonal:
    """Q = D3 P2 H D2 P1 H D1 (see the module docstring): O(d) parameters, O(d log d) per row."""

    def __init__(self, dim: int, generator: torch.Generator):
        g = generator
        self.dim, self.blocks = dim, _blocks(dim)
        self.signs = (torch.randint(0, 2, (3, dim), generator=g) * 2 - 1).float()
        self.perms = torch.stack([torch.randperm(dim, generator=g) for _ in range(2)]).int()

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        s, p = self.signs.to(r.device, r.dtype), self.perms.to(r.device).long()
        y = fwht_blocks(r * s[0], self.blocks)
        y = fwht_blocks(y[:, p[0]] * s[1], self.blocks)
        return y[:, p[1]] * s[2]

    def matrix(self) -> torch.Tensor:
        """The dense d x d matrix (for tests and analysis; never needed to apply the map)."""
        return self(torch.eye(self.dim, dtype=torch.float64)).T


class UserTransform:
    """One per-user map; ``__call__`` takes [n, in_dim] and returns [n, out_dim]."""

    def __init__(self, kind: str, in_dim: int, generator: torch.Generator, shift_std: float = 1.0,
                 pad_ratio: float = 0.25, code_ratio: float = 2.0):
        self.kind, self.in_dim = kind, in_dim
        g = generator
        if kind == "affine":
            self.q = StructuredOrthogonal(in_dim, g)
            self.scale = torch.exp(torch.empty(in_dim, dtype=torch.float64).uniform_(-math.log(2), math.log(2), generator=g)).float()
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
            self.maps = [StructuredOrthogonal(in_dim, g) for _ in range(math.ceil(self.out_dim / in_dim))]
        else:
            raise ValueError(f"unknown transform {kind!r}; use one of {TRANSFORM_KINDS} joined by '+', or 'none'")

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        if r.ndim != 2 or r.shape[1] != self.in_dim:
            raise ValueError(f"transform {self.kind} expects [n, {self.in_dim}], got {tuple(r.shape)}")
        dev, dt = r.device, r.dtype
        if self.kind == "affine":
            return self.q(r * self.scale.to(dev, dt)) + self.shift.to(dev, dt)
        if self.kind == "pad":
            return torch.cat([r, self.values.to(dev, dt).expand(r.shape[0], -1)], dim=1)
        if self.kind == "add":
            out = torch.empty(r.shape[0], self.out_dim, device=dev, dtype=dt)
            out[:, self.const_pos.to(dev)] = self.values.to(dev, dt)
            out[:, self.data_pos.to(dev)] = r
            return out
        if self.kind == "shuffle":
            return r[:, self.perm.to(dev)]
        return (torch.cat([q(r) for q in self.maps], dim=1)[:, :self.out_dim] > 0).to(dt)

    @property
    def matrix(self) -> torch.Tensor:
        """Dense A = Q diag(s) of an affine part (for tests and analysis)."""
        return (self.q.matrix() * self.scale.double()).float()


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
