"""The LAION-mi pitfall offline (thesis §7.4 pitfall 1, App. B.6) on the built-in digits.

Two targets, two membership labellings of the same 1797 sklearn digits:

* the *large* model is trained on the whole fixed member half (898 digits,
  :func:`rsgm.datamodules.membership.digits_split`); its non-members are the other half;
* the *fine-tuned* model starts from the large one and is fine-tuned on ``n_finetune``
  digits of the non-member half (the POKEMON setting: a few hundred samples, many steps);
  its members are those digits and its non-members the rest of that half (digits neither
  model saw). The large model's members are neither for the fine-tuned model's evaluation.

:class:`DigitsFineTuneData` is the fine-tuning set (its ``split`` is exported as
``membership.json`` by the training module); :class:`DigitsPitfallMembership` yields every
digit once with ``membership`` (B, n_targets): 1 member, 0 non-member, -1 not evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from rsgm.datamodules.membership import DigitsDiffusionData, _collate, digits_images, digits_split
from rsgm.errors import RSGMError


class DigitsFineTuneData(DigitsDiffusionData):
    """The first ``n_finetune`` digits of the fixed non-member half (seeded order)."""

    def __init__(self, n_finetune: int = 200, image_size: int = 8, seed: int = 0, batch_size: int = 64, num_workers: int = 0) -> None:
        super().__init__(None, image_size, seed, batch_size, num_workers)
        half = digits_split(seed)["nonmembers"]
        if not 0 < n_finetune < len(half):
            raise ValueError(f"n_finetune must be in 1..{len(half) - 1}, got {n_finetune}.")
        self.split = {"members": half[:n_finetune], "nonmembers": half[n_finetune:]}


def _read_split(path: str) -> dict[str, list[int]]:
    p = Path(path)
    if not p.is_file():
        raise RSGMError(f"membership file '{p}' not found: train the pitfall targets first (docs/laionmi.md: rsgm fit with configs/laionmi_pitfall_large.yaml, then configs/laionmi_pitfall_finetune.yaml).")
    return json.loads(p.read_text())


class DigitsPitfallMembership(LightningDataModule):
    """Args:
        splits: target name -> its ``membership.json`` (same order as the attack's targets).
        max_per_class: evaluate at most this many members and non-members per target
            (a seeded random subset; the rest are labelled -1), to bound the cost.
    """

    def __init__(self, splits: dict[str, str], max_per_class: int | None = None, image_size: int = 8, batch_size: int = 256,
                 seed: int = 0) -> None:
        super().__init__()
        self.splits, self.max_per_class, self.image_size, self.batch_size, self.seed = splits, max_per_class, image_size, batch_size, seed
        self.rows: list[dict] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.rows is not None:
            return
        x, y = digits_images(self.image_size)
        lab = torch.full((len(x), len(self.splits)), -1, dtype=torch.long)
        rng = np.random.default_rng(self.seed)
        for k, path in enumerate(self.splits.values()):
            s = _read_split(path)
            for value, key in ((1, "members"), (0, "nonmembers")):
                idx = np.asarray(s[key])
                if self.max_per_class is not None and len(idx) > self.max_per_class:
                    idx = rng.choice(idx, self.max_per_class, replace=False)  # a seeded random subset
                lab[torch.as_tensor(idx), k] = value
        self.rows = [{"x": x[i], "cond": y[i], "membership": lab[i], "is_member": int(lab[i, 0]), "index": i} for i in range(len(x))]

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=self.batch_size, shuffle=False, collate_fn=_collate)
