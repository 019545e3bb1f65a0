"""Keyed noise of B4B: the same query cell always gets the same noise, so averaging gains nothing.

Fresh noise per answer can be averaged away: the mean of k answers to one query has noise
sigma / sqrt(k), and repeats (or tiny perturbations) cost no coverage.  rsgm instead derives
the noise of a query from the user's secret key, the query's LSH buckets and the user's
coverage level::

    k_U    = HMAC-SHA256(secret, "noise" || user || occupied)[:8]     (occupied = #occupied buckets)
    row_p  = mix64(k_U xor (p << 32 | bucket_p(r))) mod M             for each hash p = 1..P
    z(r)   = (1 / sqrt(P)) * sum_p  G[row_p]                          G: M x d secret N(0, 1) table
    answer = T_U(r + sigma * z(r))

Properties (tested in tests/test_defenses_noise.py, analysed in docs/b4b.md):

* every query in one full LSH cell (all P buckets equal) gets the same z: averaging repeats
  or perturbations that stay in the cell leaves sigma * z untouched;
* z changes only where a bucket changes.  It is a sum of one term per hash, so a perturbation
  that moves k of the P buckets replaces only k/P of the noise variance: averaging answers
  cancels noise only in proportion to the distinct buckets the answers span, i.e. to the
  coverage they cost (a full-signature key would give 2^m fresh cells from m visited buckets);
* the key contains the occupied-bucket count, so a coverage increase draws all noise afresh:
  otherwise answers to one query at two noise levels, r + sigma_1 z and r + sigma_2 z, would
  lie on a line through the clean r.

What it leaks instead: two answers in one cell at one coverage level differ by the clean
difference r_1 - r_2 (the common offset cancels).  That is local shape of the encoder, never a
clean position: the attacker's best estimate of any r stays off by sigma * z.
Marginally z ~ N(0, I) whenever the P rows differ (collisions have probability ~P^2 / 2M).
"""
from __future__ import annotations

import hashlib
import hmac
import math

import numpy as np
import torch

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (a bijection on uint64 with full avalanche), vectorised."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


class KeyedNoise:
    """Noise z(user, level, buckets) from a secret table ``G`` [rows, dim] (see the module docstring)."""

    def __init__(self, secret: bytes, dim: int, rows: int = 4096):
        if not secret:
            raise ValueError("the B4B server secret is empty; set a secret (at least 16 random bytes)")
        self.secret, self.dim, self.rows = secret, dim, rows
        seed = int.from_bytes(hmac.new(secret, b"noise-table", hashlib.sha256).digest()[:8], "little") >> 1
        self.table = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))

    def user_key(self, user_id: str, level: int) -> np.uint64:
        mac = hmac.new(self.secret, b"noise\0" + user_id.encode() + b"\0" + str(int(level)).encode(), hashlib.sha256)
        return np.uint64(int.from_bytes(mac.digest()[:8], "little"))

    def rows_for(self, user_id: str, level: int, bucket_ids: torch.Tensor) -> np.ndarray:
        """Table rows [n, P] of each query's noise terms."""
        ids = bucket_ids.numpy().astype(np.uint64)
        p = np.arange(ids.shape[1], dtype=np.uint64)[None, :] << np.uint64(32)
        return (mix64(self.user_key(user_id, level) ^ (p | ids)) % np.uint64(self.rows)).astype(np.int64)

    def __call__(self, user_id: str, level: int, bucket_ids: torch.Tensor) -> torch.Tensor:
        """z [n, dim] for the queries' bucket ids [n, P]."""
        rows = torch.from_numpy(self.rows_for(user_id, level, bucket_ids))
        return self.table[rows.reshape(-1)].view(*rows.shape, self.dim).sum(1) / math.sqrt(rows.shape[1])
