"""Training-data extraction from token IARs (methods_spec §6.8).

1. Candidates: one teacher-forced conditional pass per image; the distance
   d(t, t_hat) = 100 - 100 * mean_n 1[t_n = argmax p_n] (percentage of mispredicted tokens);
   the ``per_class`` images with the smallest d in each class.
2. Generation: the first ``prefix_len`` tokens of the candidate as prefix, greedy completion
   of the rest with the class as condition, no CFG.
3. Assessment: similarity between the decoded completion and the original image, by an
   SSCD-style embedding model when one is given (cosine of embeddings), else the Pearson
   correlation of the pixels. The threshold is calibrated on the validation set (images
   the model never saw, run through the same steps): it is the largest validation
   similarity, and a training image counts as extracted only above it, so the validation
   set has zero false positives by construction.

The target is duck-typed (``complete``, ``decode``); nothing here imports a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def top_candidates(distance: Tensor, cond: Tensor, per_class: int) -> Tensor:
    """Row indices of the ``per_class`` smallest distances within each class (stable order)."""
    out = []
    for c in torch.unique(cond).tolist():
        rows = torch.nonzero(cond == c).flatten()
        order = torch.argsort(distance[rows], stable=True)
        out.append(rows[order[:per_class]])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def pixel_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of the flattened images, per pair (1 = identical up to affine grey levels)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-12)


class EmbeddingSimilarity:
    """Cosine similarity of a copy-detection model's embeddings (e.g. an SSCD TorchScript)."""

    def __init__(self, model: torch.nn.Module, size: int = 288) -> None:
        self.model, self.size = model.eval(), size

    @torch.no_grad()
    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        def emb(x):
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            x = torch.nn.functional.interpolate((x + 1) / 2, size=(self.size, self.size), mode="bilinear", align_corners=False)
            mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
            return torch.nn.functional.normalize(self.model((x - mean) / std), dim=-1)

        return (emb(a) * emb(b)).sum(-1).double()


def load_sscd(path: str | None):
    """An SSCD TorchScript from a local file, or the pixel correlation when ``path`` is None."""
    if path is None:
        return pixel_similarity
    from pathlib import Path

    from rsgm.errors import RSGMError

    if not Path(path).is_file():
        raise RSGMError(f"SSCD model '{path}' not found: put an SSCD TorchScript file (e.g. sscd_disc_mixup.torchscript.pt) there, or leave sscd_path null for pixel correlation.")
    return EmbeddingSimilarity(torch.jit.load(path, map_location="cpu"))


@torch.no_grad()
def complete_and_compare(target, images: Tensor, tokens: Tensor, cond: Tensor, prefix_len: int, similarity=pixel_similarity,
                         batch_size: int = 256, **complete_kw) -> tuple[Tensor, Tensor]:
    """Greedy completion from each image's first ``prefix_len`` tokens; returns
    ``(similarity to the original (M,), decoded completions (M, C, H, W))``."""
    sims, outs = [], []
    for a in range(0, len(tokens), batch_size):
        t, c, x = tokens[a:a + batch_size], cond[a:a + batch_size], images[a:a + batch_size]
        gen = target.decode(target.complete(t[:, :prefix_len], c, **complete_kw)).clamp(-1, 1)
        sims.append(similarity(gen.cpu(), x.cpu()))
        outs.append(gen.cpu())
    if not sims:
        return torch.zeros(0, dtype=torch.float64), images[:0]
    return torch.cat(sims), torch.cat(outs)


@dataclass
class ExtractionResult:
    threshold: float
    train_rows: Tensor        # candidate rows among the training images
    train_sims: Tensor
    train_images: Tensor      # their completions
    val_rows: Tensor
    val_sims: Tensor
    extracted: Tensor         # rows (into the training images) above the threshold

    @property
    def count(self) -> int:
        return len(self.extracted)

    @property
    def validation_false_positives(self) -> int:
        return int((self.val_sims > self.threshold).sum())


def extract(target, train: dict, val: dict, per_class: int = 5, prefix_len: int = 16, similarity=pixel_similarity, **kw) -> ExtractionResult:
    """The whole procedure. ``train`` / ``val``: dicts with ``images``, ``tokens``, ``cond``
    and ``distance`` (from one conditional pass each)."""
    vr = top_candidates(val["distance"], val["cond"], per_class)
    vs, _ = complete_and_compare(target, val["images"][vr], val["tokens"][vr], val["cond"][vr], prefix_len, similarity, **kw)
    threshold = float(vs.max()) if len(vs) else float("inf")
    tr = top_candidates(train["distance"], train["cond"], per_class)
    ts, timg = complete_and_compare(target, train["images"][tr], train["tokens"][tr], train["cond"][tr], prefix_len, similarity, **kw)
    return ExtractionResult(threshold, tr, ts, timg, vr, vs, tr[ts > threshold])
