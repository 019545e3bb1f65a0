"""Training-data extraction from IARs (methods_spec §6.8).

1. Candidates: token models (VAR, RAR): one teacher-forced conditional pass per image; the
   distance d(t, t_hat) = 100 - 100 * mean_n 1[t_n = argmax p_n] (percentage of mispredicted
   tokens). Masked continuous-token models (MAR): 5 % of the tokens are left unmasked (a
   per-sample seeded random choice) and the other 95 % are predicted in one step (one
   backbone pass, the head's DDIM sampling from seeded noise), d = ||t - t_hat||^2 summed over
   the continuous tokens (:func:`masked_candidate_distance`). Either way the ``per_class``
   images with the smallest d in each class.
2. Generation: the first ``prefix_len`` tokens of the candidate as prefix, the rest completed
   with the class as condition, no CFG: greedy decoding for token models; for masked models
   the model's own sampling (random-order rounds, DDIM head, seeded), where "first" means
   the tokenizer's order (for the built-in masked IAR: 2x2 patches in raster order, so a
   prefix of 4 tokens is the top two pixel rows, like 16 tokens of the raster IAR).
3. Assessment: similarity between the decoded completion and the original image, by an
   SSCD-style embedding model when one is given (cosine of embeddings), else the Pearson
   correlation of the pixels. The threshold is calibrated on the validation set (images
   the model never saw, run through the same steps): it is the largest validation
   similarity, and a training image counts as extracted only above it, so the validation
   set has zero false positives by construction.

The target is duck-typed (``kind``, ``complete``, ``decode``, and for masked models
``tokenize`` / ``random_mask``); nothing here imports a model.
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
def masked_candidate_distance(target, images: Tensor, cond: Tensor, index: Tensor, unmasked: float = 0.05, seed: int = 0,
                              batch_size: int = 256) -> Tensor:
    """MAR candidate distance d = ||t - t_hat||^2 (M,): ``unmasked`` of the tokens given
    (at least one masked), the rest predicted in a single step; masks and the head's sampling
    noise are seeded by the sample index, so d does not depend on batching."""
    from rsgm.privacy.iar_features import per_sample_generator

    out = []
    for a in range(0, len(images), batch_size):
        x, c, idx = images[a:a + batch_size], cond[a:a + batch_size], index[a:a + batch_size]
        t = target.tokenize(x)
        masked = torch.cat([target.random_mask(1, 1 - unmasked, generator=per_sample_generator(i, seed, 201)) for i in idx.tolist()]).to(t.device)
        t_hat = torch.stack([target.complete(t[j:j + 1], ~masked[j:j + 1], c[j:j + 1], ar_steps=1, generator=per_sample_generator(i, seed, 202))[0]
                             for j, i in enumerate(idx.tolist())])
        out.append((t - t_hat).pow(2).flatten(1).sum(1).double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _complete_prefix(target, tokens: Tensor, cond: Tensor, prefix_len: int, generator: torch.Generator | None, **kw) -> Tensor:
    if getattr(target, "kind", "token") == "token":
        return target.complete(tokens[:, :prefix_len], cond, **kw)
    known = (torch.arange(tokens.shape[1], device=tokens.device) < prefix_len).expand(tokens.shape[0], -1)
    return target.complete(torch.where(known.unsqueeze(-1), tokens, torch.zeros_like(tokens)), known, cond, generator=generator, **kw)


@torch.no_grad()
def complete_and_compare(target, images: Tensor, tokens: Tensor, cond: Tensor, prefix_len: int, similarity=pixel_similarity,
                         batch_size: int = 256, seed: int = 0, **complete_kw) -> tuple[Tensor, Tensor]:
    """Completion from each image's first ``prefix_len`` tokens (greedy for token models, the
    model's seeded sampling for masked ones); returns ``(similarity to the original (M,),
    decoded completions (M, C, H, W))``."""
    sims, outs = [], []
    g = torch.Generator().manual_seed(seed)
    for a in range(0, len(tokens), batch_size):
        t, c, x = tokens[a:a + batch_size], cond[a:a + batch_size], images[a:a + batch_size]
        gen = target.decode(_complete_prefix(target, t, c, prefix_len, g, **complete_kw)).clamp(-1, 1)
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
    and ``distance`` (:func:`top_candidates` ranks by it; token models: from the features'
    conditional pass, masked models: :func:`masked_candidate_distance`)."""
    vr = top_candidates(val["distance"], val["cond"], per_class)
    vs, _ = complete_and_compare(target, val["images"][vr], val["tokens"][vr], val["cond"][vr], prefix_len, similarity, **kw)
    threshold = float(vs.max()) if len(vs) else float("inf")
    tr = top_candidates(train["distance"], train["cond"], per_class)
    ts, timg = complete_and_compare(target, train["images"][tr], train["tokens"][tr], train["cond"][tr], prefix_len, similarity, **kw)
    return ExtractionResult(threshold, tr, ts, timg, vr, vs, tr[ts > threshold])
