"""Membership DataModules: suspect set P and non-member reference set U in one batch shape.

Every batch is ``{x, cond, is_member, in_suspect, index}``:

* ``x``: images in [-1, 1], (B, C, H, W);
* ``cond``: class ids (long tensor) or captions (list of str);
* ``is_member``: ground truth, 1 if the sample was in the target's training set;
* ``in_suspect``: the sample's role in the audit, 1 for P and 0 for U (with contamination,
  P also holds non-members, so the two differ);
* ``index``: a unique sample id, used to de-duplicate after DDP gathering.

P holds ``round((1 - contamination) * n_suspect)`` members and the rest non-members; U
holds ``n_reference`` further non-members (``n_reference != n_suspect`` gives the imbalanced
setting of App. C.13). Datasets: sklearn digits (built in), ImageNet from local folders,
COCO 2014 captions from local folders. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from rsgm.utils.images import resize_center_crop

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


# --------------------------------------------------------------------------- images


def center_crop_resize(img: Image.Image, size: int) -> torch.Tensor:
    """ADM/DiT preprocessing: resize the shorter side to ``size`` (bicubic), center-crop a
    ``size`` x ``size`` square, and map to a (3, size, size) tensor in [-1, 1]."""
    img = resize_center_crop(img, size)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1.0


# --------------------------------------------------------------------------- digits


def digits_images(image_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 1797 8x8 digits as (N, 1, S, S) tensors in [-1, 1], with class labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0 * 2 - 1
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x, torch.from_numpy(d.target).long()


def digits_split(seed: int = 0) -> dict[str, list[int]]:
    """The fixed member / non-member halves of sklearn digits (a seeded permutation)."""
    perm = np.random.default_rng(seed).permutation(1797)
    return {"members": sorted(perm[:898].tolist()), "nonmembers": sorted(perm[898:].tolist())}


def load_split(split_file: str | None, seed: int) -> dict[str, list[int]]:
    if split_file is None:
        return digits_split(seed)
    path = Path(split_file)
    if not path.is_file():
        raise FileNotFoundError(f"membership split file '{path}' not found: train the target with `rsgm fit --config configs/dm_digits.yaml`, which writes it next to the exported model.")
    split = json.loads(path.read_text())
    if not split.get("members") or not split.get("nonmembers"):
        raise ValueError(f"membership split file '{path}' must list non-empty 'members' and 'nonmembers' index lists.")
    return split


class _TensorDataset(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "cond": self.y[i]}


class DigitsDiffusionData(LightningDataModule):
    """Training data of the built-in target: the first ``n_members`` of the fixed member half
    of sklearn digits. A small member set trained for many epochs is memorised strongly
    enough to be found by CDI with few samples."""

    def __init__(self, n_members: int | None = None, image_size: int = 8, seed: int = 0, batch_size: int = 64, num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.split = digits_split(seed)
        if n_members is not None:
            if not 0 < n_members <= len(self.split["members"]):
                raise ValueError(f"n_members must be in 1..{len(self.split['members'])}, got {n_members}.")
            # Members not used for training join the non-members: they are unseen too.
            extra = self.split["members"][n_members:]
            self.split = {"members": self.split["members"][:n_members], "nonmembers": sorted(self.split["nonmembers"] + extra)}

    def setup(self, stage: str | None = None) -> None:
        x, y = digits_images(self.hparams.image_size)
        idx = torch.tensor(self.split["members"])
        self.train_set = _TensorDataset(x[idx], y[idx])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, num_workers=self.hparams.num_workers, drop_last=False)


# --------------------------------------------------------------------------- membership datasets


class _MembershipDataset(Dataset):
    """Rows ``(loader_key, is_member, in_suspect)``; ``load(key) -> (x, cond)``."""

    def __init__(self, rows: list[tuple], load) -> None:
        self.rows, self.load = rows, load

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        key, is_member, in_suspect = self.rows[i]
        x, cond = self.load(key)
        return {"x": x, "cond": cond, "is_member": is_member, "in_suspect": in_suspect, "index": i}


def _collate(batch: list[dict]) -> dict:
    out = {}
    for k in batch[0]:
        vals = [b[k] for b in batch]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        elif isinstance(vals[0], str):
            out[k] = vals
        else:
            out[k] = torch.tensor(vals)
    return out


class MembershipDataModule(LightningDataModule):
    """Builds P and U from a member pool and a non-member pool (subclasses supply the pools).

    n_suspect / n_reference: |P| and |U| (None = as many as the pools allow, |U| = |P|
    when balanced). contamination: fraction of P that are non-members.
    """

    def __init__(self, n_suspect: int | None = None, n_reference: int | None = None, contamination: float = 0.0,
                 batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 <= contamination <= 1.0:
            raise ValueError(f"contamination must lie in [0, 1], got {contamination}.")
        self.n_suspect, self.n_reference, self.contamination = n_suspect, n_reference, contamination
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.dataset: _MembershipDataset | None = None

    def pools(self) -> tuple[list, list]:
        raise NotImplementedError

    def load(self, key):
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        members, nonmembers = self.pools()
        if not members:
            raise ValueError(f"{type(self).__name__}: the member pool is empty; check the member folder or split.")
        if not nonmembers:
            raise ValueError(f"{type(self).__name__}: the non-member pool is empty; check the non-member folder or split.")
        rng = np.random.default_rng(self.seed)
        members = [members[i] for i in rng.permutation(len(members))]
        nonmembers = [nonmembers[i] for i in rng.permutation(len(nonmembers))]
        r = self.contamination
        # Largest balanced |P| = |U| the pools allow under contamination r.
        n_p = self.n_suspect or int(min(len(members) / max(1 - r, 1e-9), len(nonmembers) / (1 + r)))
        n_u = self.n_reference or n_p
        n_bad = int(round(r * n_p))
        if n_p - n_bad > len(members) or n_bad + n_u > len(nonmembers):
            raise ValueError(f"|P| = {n_p} (contamination {r}) and |U| = {n_u} need {n_p - n_bad} members and {n_bad + n_u} non-members; the pools hold {len(members)} and {len(nonmembers)}.")
        rows = [(k, 1, 1) for k in members[: n_p - n_bad]]
        rows += [(k, 0, 1) for k in nonmembers[:n_bad]]
        rows += [(k, 0, 0) for k in nonmembers[n_bad: n_bad + n_u]]
        self.dataset = _MembershipDataset(rows, self.load)

    def _loader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, collate_fn=_collate)

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()


class DigitsMembership(MembershipDataModule):
    """The built-in audit: members are the digits the built-in target was trained on, read
    from the ``membership.json`` it exported (or recomputed from ``split_seed``)."""

    def __init__(self, split_file: str | None = None, split_seed: int = 0, image_size: int = 8, **kwargs) -> None:
        super().__init__(**kwargs)
        self.split_file, self.split_seed, self.image_size = split_file, split_seed, image_size

    def pools(self):
        split = load_split(self.split_file, self.split_seed)
        self._x, self._y = digits_images(self.image_size)
        return list(split["members"]), list(split["nonmembers"])

    def load(self, key):
        return self._x[key], self._y[key]


class LocalImageMembership(MembershipDataModule):
    """Members from a local ``train`` split, non-members from ``val``: subclasses list
    ``(image path, condition)`` pairs in ``_scan``; images are center-cropped and resized."""

    root: Path
    image_size: int
    max_members: int | None
    max_nonmembers: int | None

    def _scan(self, split: str, limit: int | None) -> list[tuple[str, object]]:
        raise NotImplementedError

    def _subsample(self, items: list, limit: int | None) -> list:
        """At most ``limit`` items, a seeded random subset kept in listing order."""
        if limit is not None and len(items) > limit:
            keep = np.random.default_rng(self.seed).choice(len(items), limit, replace=False)
            items = [items[i] for i in sorted(keep)]
        return items

    def pools(self):
        return self._scan("train", self.max_members), self._scan("val", self.max_nonmembers)

    def load(self, key):
        path, condition = key
        with Image.open(path) as img:
            return center_crop_resize(img, self.image_size), condition


class ImageNetMembership(LocalImageMembership):
    """ImageNet-1k: train images are members, val images non-members (the target's own
    held-out split). Layout ``root/train/<synset>/*.JPEG`` and ``root/val/<synset>/*.JPEG``;
    class ids follow the sorted synset order (the standard 0..999). Images are center-cropped
    and resized to ``image_size``."""

    def __init__(self, root: str, image_size: int = 256, max_members: int | None = 20000, max_nonmembers: int | None = 20000, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root, self.image_size = Path(root), image_size
        self.max_members, self.max_nonmembers = max_members, max_nonmembers

    def _scan(self, split: str, limit: int | None) -> list[tuple[str, int]]:
        folder = self.root / split
        if not folder.is_dir():
            raise FileNotFoundError(f"ImageNet {split} folder '{folder}' not found: put the ImageNet-1k {split} images there as {split}/<synset>/<image>.JPEG (val sorted into synset folders too).")
        synsets = sorted(p.name for p in (self.root / "train").iterdir() if p.is_dir()) if (self.root / "train").is_dir() else []
        if not synsets:
            raise FileNotFoundError(f"no synset folders under '{self.root / 'train'}': the class order is taken from train/<synset>/ folders.")
        cls = {s: i for i, s in enumerate(synsets)}
        items = []
        for s in synsets:
            d = folder / s
            if d.is_dir():
                items += [(str(p), cls[s]) for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not items:
            raise FileNotFoundError(f"no images found under '{folder}/<synset>/'.")
        return self._subsample(items, limit)


class COCOCaptionsMembership(LocalImageMembership):
    """COCO 2014 with captions: train2014 images are members, val2014 non-members. Needs
    ``root/train2014/``, ``root/val2014/`` and ``root/annotations/captions_{train,val}2014.json``.
    The condition is the image's first caption (lowest annotation id)."""

    def __init__(self, root: str, image_size: int = 256, max_members: int | None = 20000, max_nonmembers: int | None = 20000, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root, self.image_size = Path(root), image_size
        self.max_members, self.max_nonmembers = max_members, max_nonmembers

    def _scan(self, split: str, limit: int | None) -> list[tuple[str, str]]:
        folder = self.root / f"{split}2014"
        ann = self.root / "annotations" / f"captions_{split}2014.json"
        if not folder.is_dir():
            raise FileNotFoundError(f"COCO folder '{folder}' not found: put the COCO 2014 {split} images there.")
        if not ann.is_file():
            raise FileNotFoundError(f"COCO caption file '{ann}' not found: put annotations/captions_{split}2014.json from the COCO 2014 annotations there.")
        data = json.loads(ann.read_text())
        files = {im["id"]: im["file_name"] for im in data["images"]}
        first: dict[int, tuple[int, str]] = {}
        for a in data["annotations"]:
            if a["image_id"] not in first or a["id"] < first[a["image_id"]][0]:
                first[a["image_id"]] = (a["id"], a["caption"].strip())
        items = [(str(folder / files[i]), first[i][1]) for i in sorted(first) if (folder / files[i]).is_file()]
        if not items:
            raise FileNotFoundError(f"none of the images listed in '{ann}' exist under '{folder}'.")
        return self._subsample(items, limit)


class CachedFeatures(LightningDataModule):
    """Rows of a saved ``features.pt`` as test batches, for re-running the statistics with
    ``--model.features_cache`` when the original images or the model are not at hand:
    ``--data rsgm.datamodules.membership.CachedFeatures --data.path <same features.pt>``."""

    def __init__(self, path: str, batch_size: int = 4096) -> None:
        super().__init__()
        self.path, self.batch_size = path, batch_size

    def setup(self, stage: str | None = None) -> None:
        from rsgm.privacy.features_cache import load_features_cache

        data = load_features_cache(self.path)
        self.rows = [{"features": data["features"][i], "is_member": int(data["is_member"][i]),
                      "in_suspect": int(data["in_suspect"][i]), "index": int(data["index"][i])} for i in range(len(data["index"]))]

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=self.batch_size, shuffle=False, collate_fn=_collate)
