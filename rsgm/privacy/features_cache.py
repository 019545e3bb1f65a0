"""The features cache of the membership attacks: ``features.safetensors`` (tensors) with the
feature names, rows per sample and feature config in its JSON header
(:mod:`rsgm.privacy.safe_files`). Written by
:class:`rsgm.lightning_modules.diffusion_attack.DiffusionAttack`, read back by it and by
:class:`rsgm.datamodules.membership.CachedFeatures`; nothing in the file is executed."""

from __future__ import annotations

from pathlib import Path

import torch

from rsgm.errors import RSGMError
from rsgm.privacy.safe_files import load_legacy_pt, load_tensors, save_tensors

FEATURES_KIND = "rsgm.features"
_REQUIRED = ("features", "is_member", "in_suspect", "index")


def save_features_cache(path: str | Path, results: dict, config: dict | None = None) -> Path:
    """Write the gathered features as safetensors (tensors) with names, rows per sample and
    the feature config in the JSON header (:mod:`rsgm.privacy.safe_files`)."""
    meta = {"names": list(results["names"]), "rows_per_sample": results.get("rows_per_sample", {}), "config": config or {}}
    return save_tensors(path, FEATURES_KIND, {k: results[k] for k in _REQUIRED}, meta)


def load_features_cache(path: str | Path) -> dict:
    """Read a features cache written by :class:`DiffusionAttack`: ``features.safetensors``
    (or an older ``features.pt``, read with ``weights_only=True``). Nothing in the file is
    executed; a wrong format, version or shape is refused with one line (RSGMError)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"features cache '{path}' not found: pass the features.safetensors of an earlier `rsgm test` run folder.")
    if path.suffix == ".pt":
        data = load_legacy_pt(path, "features cache")
        missing = sorted({"names", *_REQUIRED} - set(data))
        if missing:
            raise RSGMError(f"features cache '{path}' lacks {missing}; it must be written by rsgm's diffusion attack.")
    else:
        tensors, meta = load_tensors(path, FEATURES_KIND, _REQUIRED)
        if not isinstance(meta.get("names"), list):
            raise RSGMError(f"features cache '{path}' has no feature names; re-create it with rsgm test.")
        data = {**tensors, **meta}
    n, names = len(data["index"]), data["names"]
    if not all(isinstance(x, str) for x in names):
        raise RSGMError(f"features cache '{path}': names must be strings; re-create it with rsgm test.")
    if tuple(data["features"].shape) != (n, len(names)):
        raise RSGMError(f"features cache '{path}': features {tuple(data['features'].shape)} do not match {n} samples x {len(names)} names.")
    for k in ("is_member", "in_suspect", "index"):
        if tuple(data[k].shape) != (n,) or data[k].is_floating_point():
            raise RSGMError(f"features cache '{path}': {k} must be {n} integers, got {tuple(data[k].shape)} {data[k].dtype}.")
    if len(torch.unique(data["index"])) != n:
        raise RSGMError(f"features cache '{path}': repeated sample indices; re-create it with rsgm test.")
    return data
