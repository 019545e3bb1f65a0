"""Image folders on local disk for the real B4B setting (ImageNet queries, downstream tasks).

Layout: ``<root>/<class name>/<image files>`` (jpg, jpeg, png, bmp, webp), the usual
ImageFolder convention; classes are sorted by name.  Images load lazily: ``LazyImages`` holds
file paths, slicing returns another ``LazyImages`` and indexing with a list / tensor of
positions returns the stacked batch, so 100k ImageNet queries never sit in memory at once.
"""
from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader

from rsgm.datamodules.b4b_testbed import Account, Task, _QueryDataset
from rsgm.utils.images import resize_center_crop

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_image(path: Path, size: int) -> torch.Tensor:
    """RGB, shorter side resized to size * 8/7, centre crop ``size``, ImageNet normalisation."""
    with Image.open(path) as im:
        im = resize_center_crop(im, size, short_side=round(size * 8 / 7), resample=Image.BILINEAR)
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


class LazyImages:
    """A sequence of image files that behaves like an image tensor for the B4B code paths."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return LazyImages(self.paths[idx], self.size)
        if isinstance(idx, int):
            return load_image(self.paths[idx], self.size)
        return torch.stack([load_image(self.paths[int(i)], self.size) for i in idx])

    def cat(self, other: LazyImages) -> LazyImages:
        return LazyImages(self.paths + other.paths, self.size)


def scan_image_folder(root: str | Path, what: str, max_images: int | None = None, seed: int = 0) -> tuple[list[Path], torch.Tensor]:
    """Files and class labels of an ImageFolder; ``max_images`` keeps a seeded random subset."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} folder {root} not found; put the images there as <class>/<image files> or fix the path in the config")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f)
                labels.append(c)
    if not files:
        raise FileNotFoundError(f"{what} folder {root} holds no images; expected <class>/<image files> ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    labels = torch.tensor(labels)
    if max_images is not None and max_images < len(files):
        keep = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:max_images].sort().values
        files, labels = [files[i] for i in keep], labels[keep]
    return files, labels


class B4BImageFolderDataModule(LightningDataModule):
    """The Table 6.4.1 accounts on real data from local folders.

    Args:
        query_root: the stealing corpus as an image folder (ImageNet train resized; labels unused).
        tasks: task name -> ``{"train": folder, "test": folder}`` for the legitimate users
            (CIFAR10, STL10, SVHN, FashionMNIST exported as image folders).
        attack_queries, sybils, sybil_overlap, batch_size: as in ``B4BTestbedDataModule``.
        image_size: side of the centre crop fed to the encoder (224 for SimSiam).
        max_task_images: cap per task split (None: ALL, as the thesis).
    """

    def __init__(self, query_root: str, tasks: dict[str, dict[str, str]], attack_queries: list[int] = (50000, 100000),
                 sybils: list[int] = (2,), sybil_overlap: int = 10000, image_size: int = 224, batch_size: int = 64,
                 max_task_images: int | None = None, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.accounts: list[Account] = []

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        files, _ = scan_image_folder(hp.query_root, "stealing query (ImageNet train)")
        perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(hp.seed + 20)).tolist()
        self.pool = LazyImages([files[i] for i in perm], hp.image_size)
        self.tasks = {}
        for name, split in hp.tasks.items():
            if not {"train", "test"} <= set(split):
                raise ValueError(f"task {name} needs both 'train' and 'test' folders in the config")
            tr, ytr = scan_image_folder(split["train"], f"{name} train", hp.max_task_images, hp.seed)
            te, yte = scan_image_folder(split["test"], f"{name} test", hp.max_task_images, hp.seed)
            self.tasks[name] = Task(name, LazyImages(tr, hp.image_size), ytr, LazyImages(te, hp.image_size), yte)
        largest = max(hp.attack_queries)
        if largest > len(self.pool):
            raise ValueError(f"attack budget {largest} exceeds the {len(self.pool)} images in {hp.query_root}")
        accounts = [Account(f"legit-{t}", "legit", task.x_train.cat(task.x_test), task=t) for t, task in self.tasks.items()]
        accounts += [Account(f"attack-{q}", "attack", self.pool[:q], scenario=f"attack-{q}") for q in hp.attack_queries]
        for k in hp.sybils:
            per = largest // k
            for i in range(k):
                start = hp.sybil_overlap + i * (per - hp.sybil_overlap)
                imgs = self.pool[:hp.sybil_overlap].cat(self.pool[start:start + per - hp.sybil_overlap])
                accounts.append(Account(f"sybil{k}x{per}-{i}", "sybil", imgs, scenario=f"sybil{k}x{per}", overlap=hp.sybil_overlap))
        self.accounts = accounts

    def test_dataloader(self) -> DataLoader:
        return DataLoader(_QueryDataset(self.accounts, self.hparams.batch_size), batch_size=None, shuffle=False,
                          collate_fn=None)
