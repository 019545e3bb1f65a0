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
