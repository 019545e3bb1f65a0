"""Network calls of IAR feature extraction: rsgm's shared passes vs a per-attack baseline.

For each built-in IAR (random weights, the digits' shapes) the script extracts every MIA
feature of 64 digits and counts the backbone passes the adapter reports, per sample and per
noise draw. rsgm runs one conditional and one null pass and computes every MIA from them
(MAR: one pass per class; the 64 noise draws go through the small head together). The
baseline is the straightforward implementation that runs its own passes for each MIA family
(and, for MAR, one backbone pass per noise draw). Wall time is printed for both.

    python benchmarks/iar_calls.py
"""

from __future__ import annotations

import time

import torch

from rsgm.components.iar import MaskedIAR, RasterIAR, ScaleIAR
from rsgm.components.iar_adapters import BuiltinIARTarget
from rsgm.datamodules.membership import digits_images
from rsgm.privacy import iar_mia as M
from rsgm.privacy.iar_features import IARFeatureConfig, extract_features

FAMILIES = ["loss", "zlib", "hinge", "mink", "minkpp", "surp", "camia"]


@torch.no_grad()
def baseline(target, x, y, cfg: IARFeatureConfig) -> None:
    """One cond and one null pass per MIA family (token models); per draw (MAR)."""
    tokens = target.tokenize(x)
    null = target.null_cond(len(y))
    if target.kind == "token":
        for _ in FAMILIES:
            lc, ln = target.logits(tokens, y), target.logits(tokens, null)
            M.logit_features(lc - ln, tokens, cfg.mia)
        return
    mask = target.random_mask(len(y), cfg.mask_ratio)
    N, D = tokens.shape[1:]
    for _ in range(cfg.draws):
        eps = torch.randn(1, len(y), N, D)
        target.token_losses(tokens, y, cfg.timestep, mask, eps)
        target.token_losses(tokens, null, cfg.timestep, mask, eps)


def main() -> None:
    torch.manual_seed(0)
    x, y = digits_images()
    x, y = x[:64], y[:64]
    idx = torch.arange(64)
    cfg = IARFeatureConfig(draws=64)
    print(f"{'model':<10}{'method':<10}{'passes/sample':>15}{'passes/sample/draw':>20}{'seconds':>10}")
    for cls in (RasterIAR, ScaleIAR, MaskedIAR):
        for method in ("rsgm", "baseline"):
            tgt = BuiltinIARTarget(model=cls().eval()).load()
            t0 = time.perf_counter()
            if method == "rsgm":
                extract_features(tgt, x, y, idx, cfg)
            else:
                baseline(tgt, x, y, cfg)
            dt = time.perf_counter() - t0
            per = tgt.calls["forward"] / len(x)
            draws = cfg.draws if cls is MaskedIAR else 1
            print(f"{cls.__name__:<10}{method:<10}{per:>15.2f}{per / draws:>20.3f}{dt:>10.2f}")


if __name__ == "__main__":
    main()
