"""The synthetic 2-D benchmark of thesis §4.4.1 (Table 4.4.1).

Nine classes sit on a 3x3 grid of centres ``spacing`` apart; a binary ``spread`` flag sets
the cluster variance to 1 (spread = 0) or 100 (spread = 1). The condition is the one-hot
class followed by the spread flag (10 values). f_div (eq. 4.3) is computed from the
training points exactly as for ZDC images, so SDI-GAN learns from the data which conditions
are diverse.
"""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from rsgm.physics.features import condition_groups, per_condition_diversity

N_CLASSES = 9
VARIANCE = {0: 1.0, 1: 100.0}


def make_synthetic2d(n_per_condition: int, spacing: float = 60.0, seed: int = 0) -> dict[str, np.ndarray]:
    """Points, labels and spread flags, ``n_per_condition`` per (class, spread) pair."""
    rng = np.random.default_rng(seed)
    label = np.repeat(np.arange(N_CLASSES), 2 * n_per_condition)
    spread = np.tile(np.repeat([0, 1], n_per_condition), N_CLASSES)
    centres = spacing * np.stack(np.divmod(np.arange(N_CLASSES), 3), axis=1).astype(np.float64)
    std = np.sqrt(np.where(spread == 1, VARIANCE[1], VARIANCE[0]))
    points = centres[label] + rng.standard_normal((len(label), 2)) * std[:, None]
    return {"x": points, "label": label, "spread": spread}


def conditions_of(label: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """One-hot class ++ spread flag, the 10-value condition vector."""
    return np.concatenate([np.eye(N_CLASSES)[label], spread[:, None].astype(np.float64)], axis=1)


class PointsDataset(Dataset):
    def __init__(self, **tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["index"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


class Synthetic2DDataModule(LightningDataModule):
    """Args:
        n_per_condition: points per (class, spread) pair before the split.
        test_fraction: share held out for evaluation (validation runs on it too).
        spacing: distance between neighbouring cluster centres.
        scale: points are divided by this for training (outputs are scaled back).
    """

    def __init__(self, n_per_condition: int = 1000, test_fraction: float = 0.2, spacing: float = 60.0,
                 scale: float = 10.0, seed: int = 0, batch_size: int = 256, eval_batch_size: int = 4096) -> None:
        super().__init__()
        if n_per_condition < 2:
            raise ValueError(f"n_per_condition must be at least 2, got {n_per_condition}")
        self.save_hyperparameters()
        self.cond_dim, self.point_dim = N_CLASSES + 1, 2
        self.train_set: PointsDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        data = make_synthetic2d(hp.n_per_condition, hp.spacing, hp.seed)
        cond = conditions_of(data["label"], data["spread"])
        n = len(cond)
        train = np.zeros(n, dtype=bool)
        train[np.random.default_rng(hp.seed + 1).permutation(n)[: int(round(n * (1 - hp.test_fraction)))]] = True
        fdiv = per_condition_diversity(data["x"], condition_groups(cond), fit_rows=train)

        def subset(mask: np.ndarray) -> PointsDataset:
            idx = np.flatnonzero(mask)
            return PointsDataset(
                x=torch.from_numpy(data["x"][idx] / hp.scale).float(), cond=torch.from_numpy(cond[idx]).float(),
                fdiv=torch.from_numpy(fdiv[idx]).float(), label=torch.from_numpy(data["label"][idx]),
                spread=torch.from_numpy(data["spread"][idx]), index=torch.from_numpy(idx),
            )

        self.train_set, self.test_set = subset(train), subset(~train)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.hparams.eval_batch_size)

    test_dataloader = val_dataloader
