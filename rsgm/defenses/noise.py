"""Keyed noise of B4B: the same query cell always gets the same noise, so averaging gains nothing.

Fresh noise per answer can be averaged away: the mean of k answers to one query has noise
sigma / sqrt(k), and repeats (or tiny perturbations) cost no coverage.  rsgm instead derives
the noise of a query from the user's secret key, the query's full LSH cell signature (all P
bucket ids) and the user's coverage level::

    k_U    = HMAC-SHA256(secret, "noise" || user || occupied)[:8]       (occupied = #occupied buckets)
    h      = mix64(... mix64(mix64(k_U xor b_1) xor (2^32 + b_2)) ... xor ((P-1) 2^32 + b_P))
    row_j  = mix64(h xor j) mod M                                       for j = 1..P
    z(r)   = (1 / sqrt(P)) * sum_j  G[row_j]                            G: M x d secret N(0, 1) table
    answer = T_U(r + sigma * z(r))

Properties (tests/test_defenses_noise.py; the analysis is in docs/b4b.md):

* every query in one cell (all P buckets equal) at one coverage level gets the same z: averaging
  repeats or perturbations that stay in the cell leaves sigma * z untouched;
* any change of a bucket gives an independent z, and the noise carries no information about
  *which* buckets a query fell in (a per-hash sum of bucket terms would: at large sigma the
  answers would become a locality-sensitive embedding of r, which measurably helped stealing);
* the key contains the occupied-bucket count, so a coverage increase draws all noise afresh:
  otherwise answers to one query at two noise levels, r + sigma_1 z and r + sigma_2 z, would
  lie on a line through the clean r.

What it leaks instead: (1) two answers in one cell at one level differ by the clean difference
r_1 - r_2 (local shape of the encoder, never a clean position); (2) new cells whose buckets
were all visited before give fresh noise without new coverage, so averaging is bounded by the
number of such cells the attacker can find near a point, which grows with the buckets visited
around it, i.e. with coverage.
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

    def cell_keys(self, user_id: str, level: int, bucket_ids: torch.Tensor) -> np.ndarray:
        """One 64-bit key per query [n] from the user's key and all P bucket ids (its cell)."""
        ids = bucket_ids.numpy().astype(np.uint64)
        h = np.full(ids.shape[0], self.user_key(user_id, level), dtype=np.uint64)
        for p in range(ids.shape[1]):
            h = mix64(h ^ ((np.uint64(p) << np.uint64(32)) | ids[:, p]))
        return h

    def rows_for(self, user_id: str, level: int, bucket_ids: torch.Tensor) -> np.ndarray:
        """Table rows [n, P] of each query's noise terms (a function of the whole cell)."""
        h = self.cell_keys(user_id, level, bucket_ids)
        j = np.arange(bucket_ids.shape[1], dtype=np.uint64)[None, :]
        return (mix64(h[:, None] ^ (j + np.uint64(1))) % np.uint64(self.rows)).astype(np.int64)

    def __call__(self, user_id: str, level: int, bucket_ids: torch.Tensor) -> torch.Tensor:
        """z [n, dim] for the queries' bucket ids [n, P]."""
        rows = torch.from_numpy(self.rows_for(user_id, level, bucket_ids))
        return self.table[rows.reshape(-1)].view(*rows.shape, self.dim).sum(1) / math.sqrt(rows.shape[1])
