"""ALICE Zero Degree Calorimeter data: the published pickles or the built-in simulator.

Published format (one folder per detector):

* ``data_<detector>_photonsum_<detector>_1_<cut>.pkl``: numpy array of photon counts,
  ``(N, 44, 44)`` for the neutron and ``(N, 56, 30)`` for the proton calorimeter;
* ``data_cond_photonsum_<detector>_1_<cut>.pkl``: pandas DataFrame with (at least) the
  columns ``Energy, Vx, Vy, Vz, Px, Py, Pz, mass, charge``.

Per sample rsgm precomputes, and caches next to the data, the diversity weight f_div
(eq. 4.3, from the training split only), the photon sum and the peak pixel. Images are
served in ``log1p`` space, conditions standardised with training-split statistics, and
the 80/20 train/test split is a deterministic function of ``seed``. The thesis has no
separate validation split, so validation runs on the test split (cap it with
``trainer.limit_val_batches`` for speed).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from rsgm.errors import BadValueError
from rsgm.physics.features import condition_groups, peak_pixel, per_condition_diversity, photon_sum
from rsgm.physics.simulator import CONDITION_COLUMNS, IMAGE_SHAPES, simulate_zdc

Detector = Literal["neutron", "proton"]


def images_to_model_space(counts: torch.Tensor) -> torch.Tensor:
    """Photon counts -> the ``log(1 + x)`` space the generators work in."""
    return torch.log1p(counts)


def model_space_to_counts(x: torch.Tensor) -> torch.Tensor:
    """Generator output -> photon counts (``exp(x) - 1``, clipped at 0)."""
    return torch.expm1(x).clamp_min(0.0)


def write_zdc_pickles(folder: str | Path, images: np.ndarray, conditions: pd.DataFrame, detector: Detector) -> tuple[Path, Path]:
    """Write images and conditions in the published pickle layout; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cut = int(np.nan_to_num(photon_sum(images)).max()) if len(images) else 0
    image_path = folder / f"data_{detector}_photonsum_{detector}_1_{cut}.pkl"
    cond_path = folder / f"data_cond_photonsum_{detector}_1_{cut}.pkl"
    pd.to_pickle(images, image_path)
    conditions.to_pickle(cond_path)
    return image_path, cond_path


def _find_one(folder: Path, pattern: str, what: str, detector: str) -> Path:
    matches = sorted(folder.glob(pattern))
    if len(matches) != 1:
        found = "none" if not matches else ", ".join(m.name for m in matches)
        raise FileNotFoundError(
            f"expected exactly one {what} file matching '{pattern}' in ZDC folder '{folder}' "
            f"for the {detector} detector, found {found}; set data.images_file / data.conditions_file to choose"
        )
    return matches[0]


def validate_zdc(images: np.ndarray, conditions: pd.DataFrame, detector: str, source: str = "ZDC data") -> None:
    """Raise a one-line ValueError naming the first problem with the arrays, if any."""
    expected = IMAGE_SHAPES[detector]
    if not isinstance(images, np.ndarray) or images.ndim != 3 or tuple(images.shape[1:]) != expected:
        shape = getattr(images, "shape", type(images).__name__)
        raise BadValueError(f"{source}: images have shape {shape}, expected (N, {expected[0]}, {expected[1]}) for the {detector} detector")
    if not isinstance(conditions, pd.DataFrame):
        raise BadValueError(f"{source}: conditions must be a pandas DataFrame, got {type(conditions).__name__}")
    missing = [c for c in CONDITION_COLUMNS if c not in conditions.columns]
    if missing:
        raise BadValueError(f"{source}: conditions lack the columns {missing}; expected {list(CONDITION_COLUMNS)}")
    if len(images) != len(conditions):
        raise BadValueError(f"{source}: {len(images)} images but {len(conditions)} condition rows")
    if len(images) == 0:
        raise BadValueError(f"{source}: the data set is empty")
    n_nan = int(np.isnan(images).sum())
    if n_nan:
        raise BadValueError(f"{source}: images contain {n_nan} NaN pixel values")
    n_neg = int((images < 0).sum())
    if n_neg:
        raise BadValueError(f"{source}: images contain {n_neg} negative photon counts")
    bad = conditions[list(CONDITION_COLUMNS)].isna().sum()
    if bad.any():
        raise BadValueError(f"{source}: conditions contain NaN in columns {bad[bad > 0].index.tolist()}")


class ZDCDataset(Dataset):
    """Dict samples: ``x`` (1, H, W) log1p image, ``cond`` standardised conditions, ``fdiv``,
    ``intensity`` (photon sum), ``peak`` (row, col) scaled to [0, 1], and ``index``."""

    def __init__(self, x: torch.Tensor, cond: torch.Tensor, fdiv: torch.Tensor, intensity: torch.Tensor,
                 peak: torch.Tensor, index: torch.Tensor) -> None:
        self.tensors = {"x": x, "cond": cond, "fdiv": fdiv, "intensity": intensity, "peak": peak, "index": index}

    def __len__(self) -> int:
        return len(self.tensors["index"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


class ZDCDataModule(LightningDataModule):
    """ZDC responses for training and evaluating simulators.

    Args:
        path: folder with the published pickles, or ``None`` for the built-in simulator.
        detector: ``neutron`` (44x44) or ``proton`` (56x30).
        images_file / conditions_file: file names inside ``path`` when the default
            patterns do not pick exactly one file.
        n_synthetic: number of simulated samples when ``path`` is ``None``.
        test_fraction: share of the samples held out (the thesis uses 80/20).
        seed: seed of the split (and of the simulator).
        batch_size / eval_batch_size: training and evaluation batch sizes.
        cache: cache the precomputed per-sample features next to real data.
    """

    def __init__(
        self,
        path: str | None = None,
        detector: Detector = "neutron",
        images_file: str | None = None,
        conditions_file: str | None = None,
        n_synthetic: int = 20_000,
        test_fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        num_workers: int = 0,
        cache: bool = True,
    ) -> None:
        super().__init__()
        if detector not in IMAGE_SHAPES:
            raise ValueError(f"unknown detector {detector!r}; choose one of {sorted(IMAGE_SHAPES)}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
        self.save_hyperparameters()
        self.image_shape = IMAGE_SHAPES[detector]
        self.cond_dim = len(CONDITION_COLUMNS)
        self.train_set: ZDCDataset | None = None
        self.test_set: ZDCDataset | None = None

    # -- loading -------------------------------------------------------------------------
    def _load_arrays(self) -> tuple[np.ndarray, pd.DataFrame, str]:
        hp = self.hparams
        if hp.path is None:
            rank_zero_info(f"ZDC: no data.path given, using the built-in synthetic simulator ({hp.n_synthetic} {hp.detector} samples)")
            images, cond = simulate_zdc(hp.n_synthetic, hp.detector, seed=hp.seed)
            return images, cond, "synthetic ZDC"
        folder = Path(hp.path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"ZDC data folder '{folder}' does not exist; put the published pickles "
                f"data_{hp.detector}_photonsum_{hp.detector}_1_<cut>.pkl and data_cond_photonsum_{hp.detector}_1_<cut>.pkl "
                "there, or set data.path to null for the built-in simulator"
            )
        image_path = folder / hp.images_file if hp.images_file else _find_one(folder, f"data_{hp.detector}_photonsum_*.pkl", "image", hp.detector)
        cond_path = folder / hp.conditions_file if hp.conditions_file else _find_one(folder, f"data_cond_photonsum_{hp.detector}_*.pkl", "condition", hp.detector)
        for p in (image_path, cond_path):
            if not p.is_file():
                raise FileNotFoundError(f"ZDC file '{p}' does not exist")
        images = pd.read_pickle(image_path)
        cond = pd.read_pickle(cond_path)
        if isinstance(images, pd.DataFrame):
            images = images.to_numpy()
        if isinstance(images, np.ndarray):  # anything else is rejected by validate_zdc
            images = images.astype(np.float32, copy=False)
        rank_zero_info(f"ZDC: read {len(images)} {hp.detector} samples from '{folder}'")
        return images, cond, image_path.name

    def _split(self, n: int) -> np.ndarray:
        """Boolean mask of training rows: a seeded shuffle, first (1 - test_fraction) rows."""
        order = np.random.default_rng(self.hparams.seed).permutation(n)
        train = np.zeros(n, dtype=bool)
        train[order[: int(round(n * (1.0 - self.hparams.test_fraction)))]] = True
        return train

    def _cache_path(self, n: int) -> Path | None:
        hp = self.hparams
        if hp.path is None or not hp.cache:
            return None
        folder = Path(hp.path)
        stats = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(folder.glob("*.pkl"))]
        key = hashlib.sha1("|".join([*stats, str(n), str(hp.seed), str(hp.test_fraction), hp.detector]).encode()).hexdigest()[:16]
        return folder / ".rsgm_cache" / f"{hp.detector}_{key}.npz"

    def _per_sample_features(self, images: np.ndarray, cond: np.ndarray, train: np.ndarray) -> dict[str, np.ndarray]:
        cache = self._cache_path(len(images))
        if cache is not None and cache.is_file():
            with np.load(cache) as f:
                return dict(f)
        feats = {
            "fdiv": per_condition_diversity(images, condition_groups(cond), fit_rows=train),
            "intensity": photon_sum(images),
            "peak": peak_pixel(images),
        }
        if cache is not None:
            try:
                cache.parent.mkdir(exist_ok=True)
                tmp = cache.with_name(cache.stem + ".tmp.npz")
                np.savez(tmp, **feats)
                tmp.replace(cache)  # atomic: a crash never leaves a half-written cache
            except OSError as err:
                rank_zero_warn(f"ZDC: could not write the feature cache ({err}); recomputing next time")
        return feats

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, table, source = self._load_arrays()
        validate_zdc(images, table, self.hparams.detector, source)
        cond = table[list(CONDITION_COLUMNS)].to_numpy(dtype=np.float64)
        train = self._split(len(images))
        feats = self._per_sample_features(images, cond, train)

        mean, std = cond[train].mean(axis=0), cond[train].std(axis=0)
        std[std == 0] = 1.0  # e.g. a constant charge column in a pure-neutron set
        self.condition_mean, self.condition_std = mean, std
        rows, cols = self.image_shape
        peak = feats["peak"] / np.array([rows - 1, cols - 1], dtype=np.float64)

        def subset(mask: np.ndarray) -> ZDCDataset:
            idx = np.flatnonzero(mask)
            return ZDCDataset(
                x=images_to_model_space(torch.from_numpy(images[idx])).unsqueeze(1),
                cond=torch.from_numpy((cond[idx] - mean) / std).float(),
                fdiv=torch.from_numpy(feats["fdiv"][idx]).float(),
                intensity=torch.from_numpy(feats["intensity"][idx]).float(),
                peak=torch.from_numpy(peak[idx]).float(),
                index=torch.from_numpy(idx),
            )

        self.train_set, self.test_set = subset(train), subset(~train)

    # -- loaders -------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True, self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False, self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False, self.hparams.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False, self.hparams.eval_batch_size)
