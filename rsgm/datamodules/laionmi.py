"""LAION-mi (thesis §7.5): members of Stable Diffusion v1.4 against de-duplicated, sanitised
non-members, from the two published tables and a local image cache.

The tables are parquet files with columns ``url`` and ``caption`` (13,396 members and
26,874 non-members as published); they carry no images. ``rsgm fetch-images --config
configs/laionmi.yaml`` fills the cache: one file per URL at :func:`image_path`. Batches have
the membership shape ``{x, cond (caption), is_member, in_suspect, index}`` of
:mod:`rsgm.datamodules.membership` (``in_suspect`` equals ``is_member``: there is no audit
role here).

Dead links are expected (about 10 % in the thesis). Missing images are counted per split and
printed; the attack set keeps the balance by taking ``min(attack_size, cached members,
cached non-members)`` of each, never a skewed set. The evaluation protocol of §4.7
(100 random subsets of 500 members + 500 non-members) is the ``subsets`` option: the
subsets are fixed at setup (``eval_subsets``, positions = batch ``index``) and the test
loader visits the union of their samples once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Sampler

from rsgm.datamodules.membership import MembershipDataModule, _collate, center_crop_resize
from rsgm.errors import RSGMError
from rsgm.privacy.laionmi_attacks import balanced_subsets

FETCH_HINT = "run `rsgm fetch-images --config configs/laionmi.yaml` to fill it"


def url_key(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:32]


def image_path(cache_dir: str | Path, url: str) -> Path:
    """Where the fetcher stores the image of ``url`` (format found from the content)."""
    key = url_key(url)
    return Path(cache_dir) / key[:2] / key


def read_table(path: str | Path, split: str):
    """The published ``url, caption`` parquet table of one split, as a pandas DataFrame."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise RSGMError(f"LAION-mi {split} table '{path}' not found: put the published {split} parquet (columns url, caption) there or set data.init_args.{split}_table.")
    df = pd.read_parquet(path)
    missing = {"url", "caption"} - set(df.columns)
    if missing:
        raise RSGMError(f"LAION-mi {split} table '{path}' lacks the column(s) {sorted(missing)}; it must have columns url and caption.")
    return df[["url", "caption"]].astype(str).reset_index(drop=True)


class BalancedSubsetSampler(Sampler):
    """Iterates the sorted union of the evaluation subsets, each sample once."""

    def __init__(self, subsets: list[np.ndarray]) -> None:
        self.subsets = subsets
        self.order = np.unique(np.concatenate(subsets)).tolist()

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class LaionMIMembership(MembershipDataModule):
    """Args:
        members_table / nonmembers_table: the published parquet tables.
        cache_dir: the image cache written by ``rsgm fetch-images``.
        image_size: side of the centre crop (512 for SD-v1.4).
        attack_size: members (and as many non-members) in the attack set (5000 in §4.7).
        subsets / subset_size: the evaluation protocol (100 x (500 + 500)); ``subsets: null``
            visits the whole attack set.
    """

    def __init__(self, members_table: str, nonmembers_table: str, cache_dir: str, image_size: int = 512,
                 attack_size: int | None = 5000, subsets: int | None = 100, subset_size: int = 500, **kwargs) -> None:
        super().__init__(**kwargs)
        self.members_table, self.nonmembers_table, self.cache_dir = members_table, nonmembers_table, Path(cache_dir)
        self.image_size, self.attack_size = image_size, attack_size
        self.subsets, self.subset_size = subsets, subset_size
        self.missing: dict[str, dict[str, int]] = {}
        self.eval_subsets: list[np.ndarray] | None = None

    def _available(self, split: str, df) -> list[tuple[str, str]]:
        items = [(str(image_path(self.cache_dir, u)), c) for u, c in zip(df["url"], df["caption"])]
        have = [it for it in items if Path(it[0]).is_file()]
        self.missing[split] = {"rows": len(items), "cached": len(have), "missing": len(items) - len(have)}
        return have

    def pools(self):
        tables = read_table(self.members_table, "members"), read_table(self.nonmembers_table, "nonmembers")
        if not self.cache_dir.is_dir():
            raise RSGMError(f"LAION-mi image cache '{self.cache_dir}' not found: {FETCH_HINT}.")
        members = self._available("members", tables[0])
        nonmembers = self._available("nonmembers", tables[1])
        for split, m in self.missing.items():
            print(f"LAION-mi {split}: {m['rows']} rows, {m['cached']} images cached, {m['missing']} missing")
        if not members or not nonmembers:
            raise RSGMError(f"LAION-mi image cache '{self.cache_dir}' holds {len(members)} member and {len(nonmembers)} non-member images: {FETCH_HINT}.")
        n = min(len(members), len(nonmembers), self.attack_size or len(members))
        self.n_suspect = self.n_reference = n  # balance: equal counts, whatever the dead links
        return members, nonmembers

    def setup(self, stage: str | None = None) -> None:
        fresh = self.dataset is None
        super().setup(stage)
        if fresh and self.subsets:
            is_member = [r[1] for r in self.dataset.rows]
            self.eval_subsets = balanced_subsets(is_member, self.subsets, min(self.subset_size, self.n_suspect), self.seed)

    def load(self, key):
        path, caption = key
        with Image.open(path) as img:
            return center_crop_resize(img, self.image_size), caption

    def _loader(self) -> DataLoader:
        if self.eval_subsets is None:
            return super()._loader()
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=BalancedSubsetSampler(self.eval_subsets),
                          num_workers=self.num_workers, collate_fn=_collate)
