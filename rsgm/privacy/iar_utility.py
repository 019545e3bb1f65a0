"""Utility of generated digits for the privacy / utility curve of the noise mitigation (§6.9).

Utility = the accuracy with which an independent digits classifier (multinomial logistic
regression on the pixels, fitted on the audit's real images) recognises the class a sample
was generated for. 10 classes, so chance is 0.1; real held-out digits score about 0.95.

Second score, a feature-space FID: the Fréchet distance between the real digits and the
generated ones in the hidden layer of a small MLP digits classifier (:func:`fit_feature_net`,
:func:`hidden_features`), the digits analogue of FID's Inception features (the distance itself
is :func:`rsgm.metrics.fidelity.frechet_distance`, computed by the attack module).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def fit_digit_classifier(images: Tensor, labels: Tensor):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=0.1, max_iter=2000).fit(images.flatten(1).double().numpy(), labels.numpy())


def fit_feature_net(images: Tensor, labels: Tensor, hidden: int = 64, seed: int = 0):
    """A one-hidden-layer ReLU MLP digits classifier; its hidden layer is the FID feature space."""
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier((hidden,), alpha=1e-3, max_iter=1000, random_state=seed).fit(images.flatten(1).double().numpy(), labels.numpy())


def hidden_features(net, images: Tensor) -> Tensor:
    """The penultimate (hidden ReLU) activations of :func:`fit_feature_net`'s classifier, (B, hidden)."""
    h = images.flatten(1).double().numpy() @ net.coefs_[0] + net.intercepts_[0]
    return torch.from_numpy(np.maximum(h, 0))


def classifier_accuracy(clf, images: Tensor, labels: Tensor) -> float:
    return float(np.mean(clf.predict(images.flatten(1).double().numpy()) == labels.numpy()))


@torch.no_grad()
def generation_utility(target, clf, per_class: int, sigma: float = 0.0, seed: int = 0, num_classes: int = 10,
                       sampling: dict | None = None) -> dict:
    """Sample ``per_class`` digits of every class with the mitigation noise ``sigma`` on the
    logits (token models) or on the sampled tokens (MAR-style models); returns the classifier
    accuracy and the samples. ``sampling``: the target's sampling options, e.g. for the
    built-in token models ``{"temperature": 0.8, "cfg": 1.0}`` (default temperature 1, no CFG)."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.arange(num_classes).repeat_interleave(per_class)
    kw = {"logit_noise": sigma} if target.kind == "token" else {"token_noise": sigma}
    kw.update(sampling or {})
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
