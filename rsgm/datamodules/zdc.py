"""ALICE Zero Degree Calorimeter data: the published pickles, rsgm's HDF5 files or the
built-in simulator.

Published format (one folder per detector; pickles are read with pandas and must come
from a trusted source, see ``rsgm.physics.zdc_files``):

* ``data_<detector>_photonsum_<detector>_1_<cut>.pkl``: numpy array of photon counts,
  ``(N, 44, 44)`` for the neutron and ``(N, 56, 30)`` for the proton calorimeter;
* ``data_cond_photonsum_<detector>_1_<cut>.pkl``: pandas DataFrame with (at least) the
  columns ``Energy, Vx, Vy, Vz, Px, Py, Pz, mass, charge``.

Per sample rsgm precomputes, and caches next to the data, the diversity weight f_div
(eq. 4.3, from the training split only), the photon sum and the peak pixel. Images are
served in ``log1p`` space, conditions standardised with training-split statistics, and
the 80/20 train/test split is a deterministic function of ``seed``. The thesis has no
separate validation split, so validation runs on the test split (cap it with
``trainer.limit_val_batches`` for speed). ``data.path`` may also name an HDF5 file in
rsgm's layout (``rsgm.physics.zdc_files``; ``rsgm convert-zdc`` converts the pickles once).
Images and conditions are paired by the conditions' DataFrame index.

Prediction (``rsgm predict``) simulates responses for the conditions of
``conditions_file`` (a published-format DataFrame pickle or an rsgm HDF5 file) or, without
it, for the test split; ``samples_per_condition`` responses per condition. Conditions are
standardised with the training statistics stored in the checkpoint.
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

from rsgm.errors import RSGMError
from rsgm.physics.features import condition_groups, peak_pixel, per_condition_diversity, photon_sum
from rsgm.physics.simulator import CONDITION_COLUMNS, IMAGE_SHAPES, simulate_zdc
from rsgm.physics.units import images_to_model_space
from rsgm.physics.zdc_files import check_conditions, is_hdf5, read_conditions, read_hdf5, read_pickle, say_pickle_trust_once, validate_zdc

Detector = Literal["neutron", "proton"]


def write_zdc_pickles(folder: str | Path, images: np.ndarray, conditions: pd.DataFrame, detector: Detector) -> tuple[Path, Path]:
    """Write images and conditions in the published pickle layout; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sums = photon_sum(images) if len(images) else np.zeros(0)
    sums = sums[np.isfinite(sums)]
    cut = int(min(sums.max(), 1e12)) if len(sums) else 0  # only a file name: bad values are refused on reading
    image_path = folder / f"data_{detector}_photonsum_{detector}_1_{cut}.pkl"
    cond_path = folder / f"data_cond_photonsum_{detector}_1_{cut}.pkl"
    pd.to_pickle(images, image_path)
    conditions.to_pickle(cond_path)
    return image_path, cond_path


def _find_one(folder: Path, pattern: str, what: str, detector: str) -> Path:
    matches = sorted(folder.glob(pattern))
    if len(matches) != 1:
        found = "none" if not matches else ", ".join(m.name for m in matches)
        raise RSGMError(
            f"expected exactly one {what} file matching '{pattern}' in ZDC folder '{folder}' "
            f"for the {detector} detector, found {found}; set data.images_file / data.conditions_file to choose"
        )
    return matches[0]


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


class ZDCConditionSet(Dataset):
    """Prediction inputs: ``samples`` consecutive rows per condition, each a dict with
    ``cond`` (standardised), ``raw_cond`` (as given), ``index`` (the condition's row label),
    ``sample`` (0..samples-1) and ``position`` (the row of the output file)."""

    def __init__(self, cond: torch.Tensor, raw_cond: torch.Tensor, index: torch.Tensor, samples: int = 1) -> None:
        self.cond, self.raw_cond, self.index, self.samples = cond, raw_cond, index, samples

    def __len__(self) -> int:
        return len(self.index) * self.samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row, sample = divmod(i, self.samples)
        return {"cond": self.cond[row], "raw_cond": self.raw_cond[row], "index": self.index[row],
                "sample": torch.tensor(sample), "position": torch.tensor(i)}


class ZDCDataModule(LightningDataModule):
    """ZDC responses for training and evaluating simulators.

    Args:
        path: folder with the published pickles, an rsgm HDF5 file, or ``None`` for the
            built-in simulator.
        detector: ``neutron`` (44x44) or ``proton`` (56x30).
        images_file / conditions_file: file names inside ``path`` when the default
            patterns do not pick exactly one file. At ``rsgm predict``, ``conditions_file``
            is instead the particle list to simulate (a path, or a name inside ``path``).
        samples_per_condition: responses generated per condition at ``rsgm predict``.
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
        samples_per_condition: int = 1,
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
            raise RSGMError(f"unknown detector {detector!r}; choose one of {sorted(IMAGE_SHAPES)}")
        if not 0.0 < test_fraction < 1.0:
            raise RSGMError(f"data.test_fraction must lie in (0, 1), got {test_fraction}")
        if samples_per_condition < 1:
            raise RSGMError(f"data.samples_per_condition must be at least 1, got {samples_per_condition}")
        self.save_hyperparameters()
        self.image_shape = IMAGE_SHAPES[detector]
        self.cond_dim = len(CONDITION_COLUMNS)
        self.train_set: ZDCDataset | None = None
        self.test_set: ZDCDataset | None = None
        self.condition_mean: np.ndarray | None = None
        self.condition_std: np.ndarray | None = None
        self.predict_conditions: tuple[np.ndarray, np.ndarray] | None = None  # (raw (N, 9), index (N,))
        self._files: list[Path] = []

    # -- loading -------------------------------------------------------------------------
    def _load_arrays(self, predicting: bool = False) -> tuple[np.ndarray, pd.DataFrame, str]:
        hp = self.hparams
        if hp.path is None:
            rank_zero_info(f"ZDC: no data.path given, using the built-in synthetic simulator ({hp.n_synthetic} {hp.detector} samples)")
            images, cond = simulate_zdc(hp.n_synthetic, hp.detector, seed=hp.seed)
            return images, cond, "synthetic ZDC"
        root = Path(hp.path)
        if root.is_file() and is_hdf5(root) or hp.images_file and is_hdf5(hp.images_file):
            h5 = root if root.is_file() else root / hp.images_file
            images, cond = read_hdf5(h5)
            self._files = [h5]
            rank_zero_info(f"ZDC: read {len(images)} {hp.detector} samples from '{h5}'")
            return images, cond, str(h5)
        if root.is_file():
            raise RSGMError(f"ZDC data.path '{root}' is a file but not HDF5 (.h5); give the folder of the published pickles or an rsgm .h5 file")
        if not root.is_dir():
            raise RSGMError(
                f"ZDC data folder '{root}' does not exist; put the published pickles "
                f"data_{hp.detector}_photonsum_{hp.detector}_1_<cut>.pkl and data_cond_photonsum_{hp.detector}_1_<cut>.pkl "
                "there (or an rsgm .h5 file), or set data.path to null for the built-in simulator"
            )
        image_path = root / hp.images_file if hp.images_file else _find_one(root, f"data_{hp.detector}_photonsum_*.pkl", "image", hp.detector)
        cond_path = (root / hp.conditions_file if hp.conditions_file and not predicting
                     else _find_one(root, f"data_cond_photonsum_{hp.detector}_*.pkl", "condition", hp.detector))
        say_pickle_trust_once(rank_zero_info)
        images = read_pickle(image_path, "image")
        cond = read_pickle(cond_path, "conditions")
        if isinstance(images, pd.DataFrame):
            images = images.to_numpy()
        self._files = [image_path, cond_path]
        rank_zero_info(f"ZDC: read {len(images) if hasattr(images, '__len__') else '?'} {hp.detector} samples from '{root}'")
        return images, cond, f"{image_path} + {cond_path.name}"

    def _particles_path(self) -> Path:
        given = Path(self.hparams.conditions_file)
        if given.is_file() or self.hparams.path is None or not Path(self.hparams.path).is_dir():
            return given
        inside = Path(self.hparams.path) / given
        return inside if inside.is_file() else given

    def _split(self, n: int, source: str) -> np.ndarray:
        """Boolean mask of training rows: a seeded shuffle, first (1 - test_fraction) rows."""
        n_train = int(round(n * (1.0 - self.hparams.test_fraction)))
        if n_train < 2 or n - n_train < 1:
            raise RSGMError(f"{source}: {n} samples give {n_train} training and {n - n_train} test samples with "
                            f"test_fraction {self.hparams.test_fraction}; at least 2 training samples (BatchNorm) and "
                            "1 test sample are needed, so add data")
        order = np.random.default_rng(self.hparams.seed).permutation(n)
        train = np.zeros(n, dtype=bool)
        train[order[:n_train]] = True
        return train

    def _cache_path(self, n: int) -> Path | None:
        hp = self.hparams
        if hp.path is None or not hp.cache or not self._files:
            return None
        stats = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in self._files]
        key = hashlib.sha1("|".join([*stats, str(n), str(hp.seed), str(hp.test_fraction), hp.detector]).encode()).hexdigest()[:16]
        return self._files[0].parent / ".rsgm_cache" / f"{hp.detector}_{key}.npz"

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
        if stage == "predict" and self.hparams.conditions_file is not None:
            if self.predict_conditions is None:
                path = self._particles_path()
                table = read_conditions(path)
                if not is_hdf5(path):
                    say_pickle_trust_once(rank_zero_info)
                raw = check_conditions(table, str(path))
                index = table.index.to_numpy() if np.issubdtype(table.index.dtype, np.integer) else np.arange(len(table))
                self.predict_conditions = (raw, index.astype(np.int64))
                rank_zero_info(f"ZDC: simulating {len(raw)} conditions from '{path}' x {self.hparams.samples_per_condition} samples")
            return
        self._setup_data(predicting=stage == "predict")

    def _setup_data(self, predicting: bool = False) -> None:
        if self.train_set is not None:
            return
        images, table, source = self._load_arrays(predicting)
        images, table, cond = validate_zdc(images, table, self.hparams.detector, source)
        train = self._split(len(images), source)
        feats = self._per_sample_features(images, cond, train)

        mean, std = cond[train].mean(axis=0), cond[train].std(axis=0)
        std[std == 0] = 1.0  # e.g. a constant charge column in a pure-neutron set
        if self.condition_mean is None:  # statistics restored from a checkpoint take precedence
            self.condition_mean, self.condition_std = mean, std
        mean, std = self.condition_mean, self.condition_std
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
        self._test_raw = (cond[~train], np.flatnonzero(~train))

    # -- checkpointed state: the condition standardisation the model was trained with ------
    def state_dict(self) -> dict:
        if self.condition_mean is None:
            return {}
        return {"condition_mean": torch.as_tensor(self.condition_mean), "condition_std": torch.as_tensor(self.condition_std)}

    def load_state_dict(self, state: dict) -> None:
        if "condition_mean" in state:
            self.condition_mean = torch.as_tensor(state["condition_mean"]).double().numpy()
            self.condition_std = torch.as_tensor(state["condition_std"]).double().numpy()

    # -- loaders -------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int, drop_last: bool = False) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0, drop_last=drop_last)

    def train_dataloader(self) -> DataLoader:
        # A last batch of one sample cannot train BatchNorm: drop it.
        return self._loader(self.train_set, True, self.hparams.batch_size,
                            drop_last=len(self.train_set) % self.hparams.batch_size == 1)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False, self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False, self.hparams.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_conditions is not None:
            raw, index = self.predict_conditions
            if self.condition_mean is None:
                rank_zero_info("ZDC: the checkpoint holds no condition statistics; recomputing them from the training data")
                self._setup_data(predicting=True)
        else:
            self._setup_data(predicting=True)
            raw, index = self._test_raw
        cond = torch.from_numpy((raw - self.condition_mean) / self.condition_std).float()
        dataset = ZDCConditionSet(cond, torch.tensor(raw), torch.tensor(index), self.hparams.samples_per_condition)
        return self._loader(dataset, False, self.hparams.eval_batch_size)
