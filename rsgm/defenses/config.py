"""The one configuration block of the B4B defence, shared by the LightningModules and the server.

Defaults are the thesis' SimSiam setting (eq. 6.1 with lambda 1e-6, alpha 1, beta 0.8; LSH of
20 hashes x 12 bits).  The testbed configs override the cost scale (alpha 10, beta 0.036, see
docs/b4b.md).  ``DefenseConfig.from_dict`` rejects unknown keys with a one-line error.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rsgm.errors import RSGMError

NOISE_MODES = ("coverage", "static")
LSH_PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class DefenseConfig:
    """B4B settings.

    noise: ``coverage`` (eq. 6.1) or ``static`` (``static_sigma`` for everyone).
    lam, alpha, beta: eq. 6.1 (coverage as a fraction).
    transform: per-user output transform, e.g. ``affine``, ``affine+pad+shuffle``, ``none``.
    n_proj, n_bits, lsh_seed, lsh_precision: the global LSH (``bf16`` inputs halve the hashing
        cost; the hyperplanes and the 240 bits are the same as in ``fp32``).
    cache_size: per-process LRU cache of user transforms (memory bound).
    noise_table_rows: rows of the secret Gaussian table the keyed noise is summed from.
    """

    noise: str = "coverage"
    lam: float = 1e-6
    alpha: float = 1.0
    beta: float = 0.8
    static_sigma: float = 0.0
    transform: str = "affine"
    n_proj: int = 20
    n_bits: int = 12
    lsh_seed: int = 0
    lsh_precision: str = "bf16"
    cache_size: int = 1024
    noise_table_rows: int = 4096

    def __post_init__(self):
        if self.noise not in NOISE_MODES:
            raise RSGMError(f"defense.noise must be one of {NOISE_MODES}, got {self.noise!r}")
        if not (self.lam > 0 and self.alpha > 0 and self.beta > 0):
            raise RSGMError(f"defense.lam, alpha and beta must be > 0, got {self.lam}, {self.alpha}, {self.beta}")
        if self.static_sigma < 0:
            raise RSGMError(f"defense.static_sigma must be >= 0, got {self.static_sigma}")
        if self.lsh_precision not in LSH_PRECISIONS:
            raise RSGMError(f"defense.lsh_precision must be one of {LSH_PRECISIONS}, got {self.lsh_precision!r}")
        if self.cache_size < 1 or self.noise_table_rows < 2:
            raise RSGMError(f"defense.cache_size must be >= 1 and noise_table_rows >= 2, got {self.cache_size}, {self.noise_table_rows}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "DefenseConfig":
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RSGMError(f"unknown defence setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def replace(self, **kw) -> "DefenseConfig":
        return dataclasses.replace(self, **kw)


# The baselines of Table 6.4.1 as overrides of one config.
PRESETS = {
    "none": dict(noise="static", static_sigma=0.0, transform="none"),
    "noise": dict(noise="static", transform="none"),
    "b4b": dict(noise="coverage"),
}
