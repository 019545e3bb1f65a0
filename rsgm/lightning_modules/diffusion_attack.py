"""Training-data identification for diffusion models: MIA features + CDI (thesis ch. 8).

``rsgm test --config configs/cdi_digits.yaml``: ``test_step`` extracts the configured
features (:mod:`rsgm.privacy.diffusion_features`) of every sample of P and U through the
target adapter (:mod:`rsgm.components.diffusion_adapters`); a "cat" metric gathers them
across DDP ranks, de-duplicated by sample index. At test end the features are saved as
``features.safetensors`` in the run folder, and the callbacks
(:class:`rsgm.callbacks.membership.MembershipMetrics`,
:class:`rsgm.callbacks.dataset_inference.DatasetInference`) compute the MIA metrics and
the dataset-inference statistics from ``self.results``.

With ``features_cache`` set, no network is evaluated: the saved features are loaded and
the statistics re-run (``target`` may then be null).
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import LightningModule

from rsgm.components.diffusion_adapters import DiffusionTarget
from rsgm.metrics.membership import MembershipFeatures
from rsgm.privacy.diffusion_features import ACCESS, DiffusionFeatureExtractor, FeatureConfig, feature_group
from rsgm.privacy.features_cache import load_features_cache, save_features_cache
from rsgm.utils.figures import run_dir


class DiffusionAttack(LightningModule):
    """Args:
        target: the audited model behind the adapter protocol (null with ``features_cache``).
        features: feature groups to extract, from dl, secmi, pia, pian, gm, ml, no, clid (conditional targets).
        feature_options: overrides of :class:`FeatureConfig` fields (timesteps, draws, p, ...).
        features_cache: a ``features.safetensors``. If the file exists, the model is never
            touched (not even loaded) and the saved features are used; if it does not and a
            target is given, the features are extracted and also written there, so the next
            run with the same command reuses them.
    """

    def __init__(self, target: DiffusionTarget | None = None,
                 features: list[str] | None = None, feature_options: dict | None = None,
                 features_cache: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["target"])
        self.cfg = FeatureConfig(**({"features": features} if features else {}), **(feature_options or {}))
        self.extractor = DiffusionFeatureExtractor(self.cfg)
        if features_cache and target is None and not Path(features_cache).is_file():
            load_features_cache(features_cache)  # the one-line "not found" error
        self.cache = load_features_cache(features_cache) if features_cache and Path(features_cache).is_file() else None
        if self.cache is None and target is None:
            raise ValueError("DiffusionAttack needs a target model (model.target) or a saved feature file (model.features_cache).")
        self.target = target
        self.collected = MembershipFeatures()
        self.results: dict | None = None

    def setup(self, stage: str) -> None:
        if self.cache is None:
            self.target.load()

    @property
    def access(self) -> dict[str, str]:
        """Feature name -> 'gray' or 'white' (the access level it needs)."""
        names = self.cache["names"] if self.cache else self.extractor.names
        return {n: ACCESS[feature_group(n)] for n in names}

    def test_step(self, batch, batch_idx):
        if self.cache is not None:
            return None
        feats = self.extractor(self.target, batch["x"], batch["cond"], batch["index"])
        if not torch.isfinite(feats).all():
            raise ValueError(f"non-finite diffusion features in batch {batch_idx}; check the target's inputs (x must be in [-1, 1]).")
        self.collected.update(feats, batch["is_member"], batch["index"], batch.get("in_suspect"))
        return None

    def on_test_epoch_end(self) -> None:
        folder = run_dir(self.trainer)
        if self.cache is not None:
            self.results = {k: self.cache[k] for k in ("names", "features", "is_member", "in_suspect", "index")}
        else:
            out = self.collected.compute()
            self.collected.reset()
            self.results = {"names": list(self.extractor.names), **{k: v.cpu() for k, v in out.items()},
                            "rows_per_sample": dict(self.extractor.rows_per_sample)}
            if self.trainer.is_global_zero:
                folder.mkdir(parents=True, exist_ok=True)
                save_features_cache(folder / "features.safetensors", self.results, vars(self.cfg))
                if self.hparams.features_cache:
                    save_features_cache(self.hparams.features_cache, self.results, vars(self.cfg))
        self.results["access"] = self.access
