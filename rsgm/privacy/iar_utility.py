"""Utility of generated digits for the privacy / utility curve of the noise mitigation (§6.9).

Utility = the accuracy with which an independent digits classifier (multinomial logistic
regression on the pixels, fitted on the audit's real images) recognises the class a sample
was generated for. 10 classes, so chance is 0.1; real held-out digits score about 0.95.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def fit_digit_classifier(images: Tensor, labels: Tensor):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=0.1, max_iter=2000).fit(images.flatten(1).double().numpy(), labels.numpy())


def classifier_accuracy(clf, images: Tensor, labels: Tensor) -> float:
    return float(np.mean(clf.predict(images.flatten(1).double().numpy()) == labels.numpy()))


@torch.no_grad()
def generation_utility(target, clf, per_class: int, sigma: float = 0.0, seed: int = 0, num_classes: int = 10) -> dict:
    """Sample ``per_class`` digits of every class (temperature 1) with the mitigation noise
    ``sigma`` on the logits (token models) or on the sampled tokens (MAR-style models);
    returns the classifier accuracy and the samples."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.arange(num_classes).repeat_interleave(per_class)
    kw = {"logit_noise": sigma} if target.kind == "token" else {"token_noise": sigma}
    x = target.sample(cond, generator=g, **kw).clamp(-1, 1).cpu()
    return {"accuracy": classifier_accuracy(clf, x, cond), "samples": x, "cond": cond}


@torch.no_grad()
def dm_generation_utility(dm, clf, per_class: int, steps: int = 50, seed: int = 0, num_classes: int = 10,
                          shape: tuple[int, ...] = (1, 8, 8)) -> dict:
    """The same utility for a pixel-space diffusion target (the diffusion adapter protocol):
    deterministic DDIM with ``steps`` steps from pure noise, class-conditional, no CFG."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.arange(num_classes).repeat_interleave(per_class)
    y = dm.encode_cond(cond)
    ab_all = dm.alphas_cumprod.double().cpu()
    ts = torch.linspace(len(ab_all) - 1, 0, steps).round().long().tolist()
    x = torch.randn(len(cond), *shape, generator=g)
    for i, t in enumerate(ts):
        ab = ab_all[t]
        ab_next = ab_all[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        eps = dm.eps(x, torch.full((len(x),), t, dtype=torch.long), y).float()
        x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
        x = (ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps).float()
    x = x.clamp(-1, 1)
    return {"accuracy": classifier_accuracy(clf, x, cond), "samples": x, "cond": cond}
