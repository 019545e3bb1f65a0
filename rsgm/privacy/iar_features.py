"""Per-sample MIA features of an IAR target, in at most two network passes per sample per draw.

The target follows the protocol of :mod:`rsgm.components.iar_adapters` (duck-typed here:
privacy code never imports a model). For a token model one batch costs exactly two
teacher-forced passes, with the true class and with the null class; every MIA (§6.2) is
computed from the conditional logits (``cond_*``) and from a CFG difference (``cfg_*``, §6.3),
in the direction set by ``cfg_difference`` (see :func:`cfg_difference_features`). For a MAR-style model one backbone pass per
class gives the per-token diffusion loss at mask ratio 0.95 and timestep t = 500, averaged
over 64 noise draws that the small head evaluates together (§6.4); ``cfg_*`` uses
``loss_null - loss_cond`` per token.

Mitigation (§6.9): for token models N(0, sigma^2) on every returned logit; for MAR-style
models N(0, sigma^2) on every clean-token prediction the head returns (one fresh draw per
noise draw, token coordinate and pass), from which the attacker's per-token loss is
computed (:meth:`rsgm.components.iar.MaskedIAR.head_loss`); the features are recomputed for
each sigma of the grid (two more backbone passes per sample per sigma for MAR).

All randomness (masks, diffusion noise, mitigation noise) is drawn per sample from a
generator seeded by the sample's index, so the features do not depend on how samples are
batched or split across DDP ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from rsgm.errors import RSGMError
from rsgm.privacy.iar_mia import KS, SURP_ENTROPIES, MIAConfig, logit_features, loss_features


CFG_DIRECTIONS = ("cond_minus_null", "null_minus_cond")


@dataclass
class IARFeatureConfig:
    ks: tuple[float, ...] = KS
    surp_entropies: tuple[float, ...] = SURP_ENTROPIES
    mask_ratio: float = 0.95
    timestep: int = 500
    draws: int = 64
    logit_noise: tuple[float, ...] = field(default_factory=tuple)  # mitigation: sigma grid (token models)
    token_noise: tuple[float, ...] = field(default_factory=tuple)  # mitigation: sigma grid (masked models)
    seed: int = 0
    cfg_difference: str = "cond_minus_null"  # or "null_minus_cond" (the authors' code); token models only

    def __post_init__(self) -> None:
        if self.cfg_difference not in CFG_DIRECTIONS:
            raise RSGMError(f"cfg_difference '{self.cfg_difference}' is unknown: use one of {', '.join(CFG_DIRECTIONS)}.")

    def noise_grid(self, kind: str) -> tuple[float, ...]:
        """The mitigation's sigma grid for a target of ``kind`` ("token": logits, "masked":
        continuous tokens); the other kind's grid must be empty."""
        mine, other, names = (self.logit_noise, self.token_noise, ("logit_noise", "token_noise")) if kind == "token" else \
            (self.token_noise, self.logit_noise, ("token_noise", "logit_noise"))
        if other:
            raise ValueError(f"{names[1]} does not apply to a {kind} target; put the sigma grid in {names[0]} instead.")
        return tuple(mine)

    @property
    def mia(self) -> MIAConfig:
        return MIAConfig(tuple(self.ks), tuple(self.surp_entropies))


def per_sample_generator(index: int, seed: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + int(index)) * 7 + salt)


def _noise_like(shape: tuple[int, ...], index: Tensor, seed: int, salt: int) -> Tensor:
    """(B, *shape) standard normal noise, row b drawn from the generator of sample index[b]."""
    return torch.stack([torch.randn(shape, generator=per_sample_generator(i, seed, salt)) for i in index.tolist()])


def _prefixed(prefix: str, feats: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}_{k}": v for k, v in feats.items()}


def cfg_difference_features(lc: Tensor, ln: Tensor, tokens: Tensor, cfg: IARFeatureConfig) -> dict[str, Tensor]:
    """The ``cfg_*`` MIAs of one pair of conditional / null logits, higher = member.

    ``cond_minus_null``: every MIA of :func:`logit_features` on d = lc - ln (the thesis' text).
    ``null_minus_cond``: every MIA on d = ln - lc (the authors' public code), then **negated**.
    The rule is fixed a priori, never chosen on data: each score of :func:`logit_features` grows
    with the softmax probability of the true token under its input; a member's true token has
    a large conditional logit, so under ln - lc it gets a *low* probability, and minus the score
    is the member-high orientation. softmax(d) and softmax(-d) differ, so the two directions
    rank samples differently (not a sign flip of each other)."""
    if cfg.cfg_difference == "cond_minus_null":
        return logit_features(lc - ln, tokens, cfg.mia)
    return {k: -v for k, v in logit_features(ln - lc, tokens, cfg.mia).items()}


@torch.no_grad()
def token_model_features(target, x: Tensor, cond: Tensor, index: Tensor, cfg: IARFeatureConfig) -> dict:
    """Features of a token model. Returns ``{"features": {name: (B,)}, "noisy": {sigma:
    {name: (B,)}}, "tokens": (B, N), "distance": (B,)}``; ``distance`` is the extraction
    candidate distance d(t, t_hat) = 100 - 100 * mean(argmax == t) of the conditional pass."""
    tokens = target.tokenize(x)
    lc = target.logits(tokens, cond).double()
    ln = target.logits(tokens, target.null_cond(len(cond), cond.device)).double()
    feats = _prefixed("cond", logit_features(lc, tokens, cfg.mia)) | _prefixed("cfg", cfg_difference_features(lc, ln, tokens, cfg))
    noisy = {}
    for j, sigma in enumerate(cfg.logit_noise):
        # The defender perturbs every logit it returns: both passes get independent noise.
        nc = lc + sigma * _noise_like(lc.shape[1:], index, cfg.seed, 2 * j + 1).to(lc)
        nn_ = ln + sigma * _noise_like(ln.shape[1:], index, cfg.seed, 2 * j + 2).to(ln)
        noisy[sigma] = _prefixed("cond", logit_features(nc, tokens, cfg.mia)) | _prefixed("cfg", cfg_difference_features(nc, nn_, tokens, cfg))
    distance = 100 - 100 * (lc.argmax(-1) == tokens).double().mean(-1)
    return {"features": feats, "noisy": noisy, "tokens": tokens, "distance": distance}


@torch.no_grad()
def masked_model_features(target, x: Tensor, cond: Tensor, index: Tensor, cfg: IARFeatureConfig) -> dict:
    """Features of a MAR-style model: loss, zlib, min-k% and CAMIA on minus the per-token
    diffusion loss (mask ratio ``cfg.mask_ratio``, timestep ``cfg.timestep``, ``cfg.draws``
    noise draws), conditional and CFG difference; the same mask and noise for both classes."""
    if cfg.cfg_difference != "cond_minus_null":
        raise RSGMError("cfg_difference applies to token models only; a masked (MAR-style) target uses loss_null - loss_cond: drop the option.")
    tokens = target.tokenize(x)
    B, N, D = tokens.shape
    masks = torch.stack([target.random_mask(1, cfg.mask_ratio, generator=per_sample_generator(i, cfg.seed, 101))[0] for i in index.tolist()]).to(tokens.device)
    eps = _noise_like((cfg.draws, N, D), index, cfg.seed, 102).transpose(0, 1).contiguous().to(tokens)
    null = target.null_cond(B, cond.device)
    feats = _loss_pair_features(target, tokens, cond, null, masks, eps, cfg)
    noisy = {}
    for j, sigma in enumerate(cfg.token_noise):
        # The defender perturbs every token prediction it returns: each pass and draw gets its own noise.
        nc, nn_ = (sigma * _noise_like((cfg.draws, N, D), index, cfg.seed, 103 + 2 * j + k).transpose(0, 1).to(tokens) for k in (0, 1))
        noisy[sigma] = _loss_pair_features(target, tokens, cond, null, masks, eps, cfg, nc, nn_)
    return {"features": feats, "noisy": noisy, "tokens": tokens.flatten(1), "distance": torch.full((B,), float("nan"), dtype=torch.float64)}


def _loss_pair_features(target, tokens, cond, null, masks, eps, cfg: IARFeatureConfig, noise_c=None, noise_n=None) -> dict:
    """``cond_*`` on minus the conditional per-token loss and ``cfg_*`` on ``loss_null - loss_cond``."""
    kw = lambda n: {} if n is None else {"token_noise": n}
    loss_c = target.token_losses(tokens, cond, cfg.timestep, masks, eps, **kw(noise_c)).double()
    loss_n = target.token_losses(tokens, null, cfg.timestep, masks, eps, **kw(noise_n)).double()
    return _prefixed("cond", loss_features(-loss_c, tokens, cfg.mia)) | _prefixed("cfg", loss_features(loss_n - loss_c, tokens, cfg.mia))


def extract_features(target, x: Tensor, cond: Tensor, index: Tensor, cfg: IARFeatureConfig) -> dict:
    fn = token_model_features if target.kind == "token" else masked_model_features
    return fn(target, x, cond, index, cfg)
