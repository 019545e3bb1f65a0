"""Built-in offline testbed for B4B: a broad image corpus, narrow downstream tasks, query schedules.

Everything is made from what ships with the installed packages, at 1 x 16 x 16 in [0, 1]:

* **digits**: sklearn's 1797 real 8x8 handwritten digits, upsampled to 16x16.  A fixed
  ``digits_holdout`` share is kept out of the broad corpus as the "digits" downstream task.
* **photo patches**: the two sklearn sample photos (china, flower) in grey, cut into 16x16
  patches at full and half resolution (label = which photo).
* **shapes**: procedurally drawn disk, square, triangle, cross, ring and bar with random size,
  position, rotation, contrast, background and pixel noise (6 classes).
* **textures**: stripes (horizontal, vertical, diagonal), checkerboard, dot lattice and smooth
  noise with random frequency, phase, contrast (6 classes).

The broad corpus (the testbed's "ImageNet") holds the non-held-out digits, all photo patches
and ``n_shapes`` / ``n_textures`` generated images; it trains the victim and is the attackers'
query pool.  Legitimate users each own one narrow task (held-out digits, fresh shapes, fresh
textures); a task is split into probe-train / probe-test halves by a fixed seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, TensorDataset

SIZE = 16
N_SHAPES, N_TEXTURES = 6, 6
# victim label space: digits 0-9, shapes, textures, then the two photos
SHAPE_OFFSET, TEXTURE_OFFSET = 10, 10 + N_SHAPES
PHOTO_OFFSET = TEXTURE_OFFSET + N_TEXTURES
N_CLASSES = PHOTO_OFFSET + 2


def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits as [1797, 1, 16, 16] in [0, 1] and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(d.target, dtype=torch.long)


def photo_patches(stride: int = 8, scales: tuple[int, ...] = (1, 2)) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey 16x16 patches of sklearn's two sample photos at several downscales; label = photo."""
    from sklearn.datasets import load_sample_images

    xs, ys = [], []
    for label, img in enumerate(load_sample_images().images):
        grey = torch.tensor(img, dtype=torch.float32).mean(-1)[None, None] / 255.0
        for s in scales:
            g = F.avg_pool2d(grey, s) if s > 1 else grey
            p = F.unfold(g, SIZE, stride=stride)[0].T.reshape(-1, 1, SIZE, SIZE)
            xs.append(p)
            ys.append(torch.full((p.shape[0],), label, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def _grid(n: int, res: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = (torch.arange(res, dtype=torch.float32) + 0.5) / res * 2 - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return xx.expand(n, res, res).contiguous(), yy.expand(n, res, res).contiguous()


def _finish(mask: torch.Tensor, g: torch.Generator, noise: float = 0.05) -> torch.Tensor:
    """Random background/foreground levels, 4x supersampling -> 16x16, pixel noise."""
    n = mask.shape[0]
    bg = torch.rand(n, 1, 1, generator=g) * 0.4
    fg = 0.5 + torch.rand(n, 1, 1, generator=g) * 0.5
    img = bg + (fg - bg) * mask
    img = F.avg_pool2d(img.unsqueeze(1), mask.shape[-1] // SIZE)
    return (img + noise * torch.randn(img.shape, generator=g)).clamp(0, 1)


def shape_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n random shapes (disk, square, triangle, cross, ring, bar) as [n, 1, 16, 16]."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(N_SHAPES, (n,), generator=g)
    xx, yy = _grid(n, 4 * SIZE)
    cx, cy = [(torch.rand(n, 1, 1, generator=g) - 0.5) * 0.6 for _ in range(2)]
    r = 0.35 + torch.rand(n, 1, 1, generator=g) * 0.4
    th = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    u = ((xx - cx) * torch.cos(th) + (yy - cy) * torch.sin(th)) / r
    v = (-(xx - cx) * torch.sin(th) + (yy - cy) * torch.cos(th)) / r
    rad = torch.sqrt(u**2 + v**2)
    masks = [
        lambda u, v, rad: rad < 1,                                                      # disk
        lambda u, v, rad: (u.abs() < 0.8) & (v.abs() < 0.8),                            # square
        lambda u, v, rad: (v > -0.6) & (v < 1.2 * (0.8 - u.abs()) - 0.3),               # triangle
        lambda u, v, rad: ((u.abs() < 0.25) & (v.abs() < 1)) | ((v.abs() < 0.25) & (u.abs() < 1)),  # cross
        lambda u, v, rad: (rad < 1) & (rad > 0.6),                                      # ring
        lambda u, v, rad: (u.abs() < 1.1) & (v.abs() < 0.22),                           # bar
    ]
    mask = torch.empty_like(u)
    for c, m in enumerate(masks):  # draw each class only where it is needed
        idx = labels == c
        mask[idx] = m(u[idx], v[idx], rad[idx]).float()
    return _finish(mask, g), labels


def texture_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n random textures (3 stripe orientations, checkerboard, dots, smooth noise) as [n, 1, 16, 16]."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(N_TEXTURES, (n,), generator=g)
    xx, yy = _grid(n, 4 * SIZE)
    f = (2 + torch.rand(n, 1, 1, generator=g) * 3) * math.pi
    ph = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    jitter = (torch.rand(n, 1, 1, generator=g) - 0.5) * 0.5
    diag = (1 + 2 * (torch.rand(n, 1, 1, generator=g) > 0.5).float()) * math.pi / 4 + jitter
    coarse = torch.rand(n, 1, 4, 4, generator=g)
    def smooth_noise(xx, yy, f, ph, jitter, diag, coarse):
        s = F.interpolate(coarse, size=(4 * SIZE, 4 * SIZE), mode="bicubic", align_corners=False)[:, 0]
        lo, hi = s.amin((1, 2), keepdim=True), s.amax((1, 2), keepdim=True)
        return (s - lo) / (hi - lo + 1e-6)

    patterns = [
        lambda xx, yy, f, ph, jitter, diag, coarse: torch.sin(f * (yy + 0.1 * jitter * xx) + ph) > 0,   # horizontal stripes
        lambda xx, yy, f, ph, jitter, diag, coarse: torch.sin(f * (xx + 0.1 * jitter * yy) + ph) > 0,   # vertical stripes
        lambda xx, yy, f, ph, jitter, diag, coarse: torch.sin(f * (xx * torch.cos(diag) + yy * torch.sin(diag)) + ph) > 0,  # diagonal
        lambda xx, yy, f, ph, jitter, diag, coarse: torch.sin(f * xx + ph) * torch.sin(f * yy + ph) > 0,  # checkerboard
        lambda xx, yy, f, ph, jitter, diag, coarse: torch.sin(f * xx + ph) * torch.sin(f * yy + ph) > 0.6,  # dot lattice
        smooth_noise,
    ]
    img = torch.empty_like(xx)
    args = (xx, yy, f, ph, jitter, diag, coarse)
    for c, p in enumerate(patterns):
        idx = labels == c
        img[idx] = p(*(a[idx] for a in args)).float()
    return _finish(img, g), labels


@dataclass
class Task:
    """One legitimate user's downstream task: probe-train / probe-test images and labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def x_all(self) -> torch.Tensor:
        return torch.cat([self.x_train, self.x_test])


def _split(name: str, x: torch.Tensor, y: torch.Tensor, seed: int, test_fraction: float = 0.3) -> Task:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(x)))
    te, tr = perm[:n_test], perm[n_test:]
    return Task(name, x[tr], y[tr], x[te], y[te])


def build_testbed(n_shapes: int = 5000, n_textures: int = 5000, n_task: int = 1500, digits_holdout: float = 0.45,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, Task]]:
    """Broad corpus (images, victim labels) and the downstream tasks {digits, shapes, textures}."""
    dx, dy = digit_images()
    perm = torch.randperm(len(dx), generator=torch.Generator().manual_seed(seed))
    n_hold = int(round(digits_holdout * len(dx)))
    hold, keep = perm[:n_hold], perm[n_hold:]
    px, py = photo_patches()
    sx, sy = shape_images(n_shapes, seed + 1)
    tx, ty = texture_images(n_textures, seed + 2)
    corpus_x = torch.cat([dx[keep], px, sx, tx])
    corpus_y = torch.cat([dy[keep], py + PHOTO_OFFSET, sy + SHAPE_OFFSET, ty + TEXTURE_OFFSET])
    # fresh seeds: task images are new draws, never part of the broad corpus
    tasks = {
        "digits": _split("digits", dx[hold], dy[hold], seed + 3),
        "shapes": _split("shapes", *shape_images(n_task, seed + 1001), seed + 4),
        "textures": _split("textures", *texture_images(n_task, seed + 1002), seed + 5),
    }
    return corpus_x, corpus_y, tasks


class B4BVictimDataModule(LightningDataModule):
    """Supervised training of the testbed victim on the broad corpus (train / val split)."""

    def __init__(self, n_shapes: int = 5000, n_textures: int = 5000, val_fraction: float = 0.1,
                 batch_size: int = 256, seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        x, y, _ = build_testbed(hp.n_shapes, hp.n_textures, seed=hp.seed)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(hp.seed + 10))
        n_val = int(hp.val_fraction * len(x))
        self.val = TensorDataset(x[perm[:n_val]], y[perm[:n_val]])
        self.train = TensorDataset(x[perm[n_val:]], y[perm[n_val:]])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.hparams.batch_size, shuffle=True, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=1024, num_workers=self.hparams.num_workers)


@dataclass
class Account:
    """One API account of the protocol: who it is and which images it sends, in order."""

    user_id: str
    kind: str  # "legit", "attack" or "sybil"
    images: torch.Tensor
    task: str | None = None  # legit users: their task
    scenario: str | None = None  # attackers / sybils: the attack this account belongs to
    overlap: int = 0  # sybils: how many leading queries every account of the scenario shares


FAST_TASK, FAST_OWN = 60, 24  # fast_dev_run: images per task split, and per attack account beyond the shared ones


def _shrink(a: Account) -> Account:
    """The account cut for fast_dev_run: sybils keep at most 40 shared queries, attackers FAST_OWN own ones."""
    ov = min(a.overlap, 40) // 2 * 2 if a.kind == "sybil" else 0
    keep = a.images if a.kind == "legit" else torch.cat([a.images[:ov], a.images[a.overlap:a.overlap + FAST_OWN]])
    return Account(a.user_id, a.kind, keep, a.task, a.scenario, ov)


class _QueryDataset(Dataset):
    def __init__(self, accounts: list[Account], batch_size: int, mixed: bool = False):
        # each batch is one API call of one account; ``mixed``: every account in one batch (fast_dev_run)
        if mixed:
            self.items = [([a.user_id for a in accounts for _ in range(len(a.images))], torch.cat([a.images for a in accounts]))]
            return
        self.items = [(a.user_id, a.images[i:i + batch_size]) for a in accounts for i in range(0, len(a.images), batch_size)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        uid, x = self.items[i]
        if not isinstance(x, torch.Tensor):  # lazy image files (real setting)
            x = x[list(range(len(x)))]
        return {"x": x, "user_id": uid}


class B4BTestbedDataModule(LightningDataModule):
    """Accounts of the Table 6.4.1 protocol on the testbed and their query stream.

    Legit users ``legit-<task>`` send their whole task (ALL).  For every budget in
    ``attack_queries`` one attacker ``attack-<budget>`` sends that many images of the shuffled
    broad corpus.  For every k in ``sybils``, k accounts ``sybil<k>x<budget>-<i>`` split the
    largest budget; each sends the first ``sybil_overlap`` pool images (shared, used for
    remapping) and then its own disjoint slice.

    ``test_dataloader`` yields ``{"x", "user_id"}`` batches of single accounts, account after
    account, which is what a served encoder would receive.  ``train_dataloader`` serves the
    (query, answer) pairs a ``StealingModule`` registered with ``set_train_pairs``.
    """

    def __init__(self, attack_queries: list[int] = (4000, 16000), sybils: list[int] = (2,), sybil_overlap: int = 500,
                 n_shapes: int = 5000, n_textures: int = 5000, n_task: int = 1500, batch_size: int = 250, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.accounts: list[Account] = []

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        corpus, _, self.tasks = build_testbed(hp.n_shapes, hp.n_textures, hp.n_task, seed=hp.seed)
        self.pool = corpus[torch.randperm(len(corpus), generator=torch.Generator().manual_seed(hp.seed + 20))]
        largest = max(hp.attack_queries)
        if largest > len(self.pool):
            raise ValueError(f"attack budget {largest} exceeds the broad corpus ({len(self.pool)} images); lower attack_queries or raise n_shapes / n_textures")
        if self.trainer is not None and self.trainer.fast_dev_run:  # wiring check: a few images per account
            self.tasks = {t: Task(t, k.x_train[:FAST_TASK], k.y_train[:FAST_TASK], k.x_test[:FAST_TASK], k.y_test[:FAST_TASK])
                          for t, k in self.tasks.items()}
        accounts = [Account(f"legit-{t}", "legit", task.x_all, task=t) for t, task in self.tasks.items()]
        accounts += [Account(f"attack-{q}", "attack", self.pool[:q], scenario=f"attack-{q}") for q in hp.attack_queries]
        for k in hp.sybils:
            per = largest // k
            if per <= hp.sybil_overlap or hp.sybil_overlap + k * (per - hp.sybil_overlap) > len(self.pool):
                raise ValueError(f"{k} sybils of {per} queries cannot share {hp.sybil_overlap} and stay within the corpus; change sybils or sybil_overlap")
            shared = self.pool[:hp.sybil_overlap]
            for i in range(k):
                start = hp.sybil_overlap + i * (per - hp.sybil_overlap)
                own = self.pool[start:start + per - hp.sybil_overlap]
                accounts.append(Account(f"sybil{k}x{per}-{i}", "sybil", torch.cat([shared, own]),
                                        scenario=f"sybil{k}x{per}", overlap=hp.sybil_overlap))
        self.accounts = accounts if self.trainer is None or not self.trainer.fast_dev_run else [_shrink(a) for a in accounts]

    def set_train_pairs(self, pairs: Dataset, batch_size: int) -> None:
        """Register the (query, answer) pairs a stealing attack collected; ``fit`` trains on them."""
        self._train_pairs, self._train_batch = pairs, batch_size

    def train_dataloader(self) -> DataLoader:
        if getattr(self, "_train_pairs", None) is None:
            raise ValueError("fit with B4BTestbedDataModule needs rsgm.lightning_modules.b4b_stealing.StealingModule, which queries the API and registers the pairs")
        return DataLoader(self._train_pairs, batch_size=self._train_batch, shuffle=True, drop_last=True)

    def test_dataloader(self) -> DataLoader:
        # fast_dev_run runs one test batch: it then holds every (shrunk) account, users mixed
        fast = self.trainer is not None and bool(self.trainer.fast_dev_run)
        return DataLoader(_QueryDataset(self.accounts, self.hparams.batch_size, mixed=fast), batch_size=None, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
