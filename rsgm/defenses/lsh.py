"""Coverage of the embedding space by locality-sensitive hashing (B4B, thesis §6.3.1).

Each of ``n_proj`` independent hashes draws ``n_bits`` Gaussian hyperplanes through the origin
(one fixed seed for all users).  The bucket of a representation r under hash p is the sign
pattern ``[w_{p,k} . r > 0]_k`` read as an integer in [0, 2^n_bits).  A user's state is one
bitset of 2^n_bits entries per hash, and

    coverage = (1 / n_proj) * sum_p  #occupied buckets of hash p / 2^n_bits        (in [0, 1]).

Averaging over several hashes reduces the variance that one unlucky set of hyperplanes gives.

``precision="bf16"`` rounds r and the hyperplanes to bfloat16 before the product (float32
accumulation): the same 240 hyperplanes at half the cost on CPUs with bf16 units.  Only points
within ~0.4 % of a hyperplane can change side; ``benchmarks/b4b_overhead.py`` measures the
throughput and the coverage difference to ``fp32``.
"""
from __future__ import annotations

import numpy as np
import torch


class LSHCoverage:
    """Global random-projection hash shared by every user.

    Args:
        dim: size of the (clean) representation that is hashed.
        n_proj: number of independent hashes (20 in the authors' code).
        n_bits: hyperplanes per hash; each hash has 2**n_bits buckets (12 in the thesis).
        seed: seed of the hyperplanes.  Changing it invalidates every stored coverage.
    """

    def __init__(self, dim: int, n_proj: int = 20, n_bits: int = 12, seed: int = 0, precision: str = "fp32"):
        if dim < 1 or n_proj < 1 or not 1 <= n_bits <= 24:
            raise ValueError(f"LSHCoverage needs dim >= 1, n_proj >= 1 and 1 <= n_bits <= 24; got {dim}, {n_proj}, {n_bits}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"LSH precision must be fp32 or bf16, got {precision!r}")
        self.dim, self.n_proj, self.n_bits, self.seed, self.precision = dim, n_proj, n_bits, seed, precision
        self.n_buckets = 2**n_bits
        g = torch.Generator().manual_seed(seed)
        # [dim, n_proj * n_bits]: one matmul hashes a whole batch under every projection.
        self.weight = torch.randn(dim, n_proj * n_bits, generator=g, dtype=torch.float64).float()
        self._weight_lp = self.weight.bfloat16() if precision == "bf16" else self.weight
        self.powers = 2 ** torch.arange(n_bits, dtype=torch.int64)

    def empty_state(self) -> np.ndarray:
        """A new user's bitsets: bool array [n_proj, 2**n_bits], all False."""
        return np.zeros((self.n_proj, self.n_buckets), dtype=bool)

    def bucket_ids(self, r: torch.Tensor) -> torch.Tensor:
        """Bucket of each row of ``r`` [n, dim] under every hash: int64 [n, n_proj]."""
        if r.ndim != 2 or r.shape[1] != self.dim:
            raise ValueError(f"LSH expects representations of shape [n, {self.dim}], got {tuple(r.shape)}")
        r = r.detach().cpu()
        r = r.bfloat16() if self.precision == "bf16" else r.float()
        bits = (r @ self._weight_lp > 0).view(r.shape[0], self.n_proj, self.n_bits)
        return (bits.long() * self.powers).sum(-1)

    @staticmethod
    def mark(state: np.ndarray, ids: torch.Tensor) -> None:
        """Set the buckets ``ids`` [n, n_proj] as occupied in ``state`` (in place)."""
        ids = ids.numpy()
        state[np.arange(state.shape[0])[None, :], ids] = True

    @staticmethod
    def occupied(state: np.ndarray) -> int:
        """Number of occupied buckets over all hashes (the integer behind the coverage)."""
        return int(np.count_nonzero(state))

    @staticmethod
    def coverage(state: np.ndarray) -> float:
        """Mean fraction of occupied buckets over the hashes."""
        return float(state.mean())

    def pack(self, state: np.ndarray) -> bytes:
        """Bitsets as bytes (n_proj * 2**n_bits / 8 bytes) for the state store."""
        return np.packbits(state, axis=1).tobytes()

    def unpack(self, blob: bytes) -> np.ndarray:
        packed = np.frombuffer(blob, dtype=np.uint8).reshape(self.n_proj, -1)
        return np.unpackbits(packed, axis=1, count=self.n_buckets).astype(bool)

    def fingerprint(self) -> str:
        """Identifies the hash; the store refuses state written under another one."""
        return f"lsh-v1:dim={self.dim}:proj={self.n_proj}:bits={self.n_bits}:seed={self.seed}"
