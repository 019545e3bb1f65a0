"""Write simulated ZDC responses from ``rsgm predict`` to HDF5 or the published pickle format.

``rsgm predict --config configs/expertsim.yaml --ckpt_path last.ckpt \\
--data.conditions_file my_particles.pkl --output showers.h5`` attaches
:class:`ZDCPredictionWriter`. Every predict batch (``predict_step`` of ConditionalGAN and
ExpertSim: responses in photon counts, the conditions as given, their ``index``,
``sample`` and output ``position``, and the ``expert`` for ExpertSim) is appended to a
per-rank HDF5 part file, so memory does not grow with the number of responses. At the end
rank 0 merges the parts into one file ordered by position (the order of the conditions,
``samples_per_condition`` consecutive rows per condition) and removes them.

Outputs:

* ``*.h5`` / ``*.hdf5``: rsgm's HDF5 layout (``rsgm.physics.zdc_files``): ``images``,
  ``conditions/<column>``, ``index``, ``sample`` and (ExpertSim) ``expert``, chunked and
  gzip-compressed; ``ZDCDataModule`` reads it back (``data.path``);
* ``*.pkl``: the published format: ``X.pkl`` holds the ``(N, H, W)`` float32 numpy array,
  ``X_cond.pkl`` a DataFrame of the conditions plus ``index``, ``sample`` (and ``expert``)
  columns, paired with the images by its index ``0..N-1``. Pickle output is built in
  memory at the end; use HDF5 for large N.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from rsgm.errors import RSGMError
from rsgm.physics.simulator import CONDITION_COLUMNS, IMAGE_SHAPES
from rsgm.physics.zdc_files import HDF5Appender, is_hdf5

FIELDS = ("index", "sample", "expert")


def _h5py():
    import h5py

    return h5py


def pickle_paths(output: str | Path) -> tuple[Path, Path]:
    """The image and condition files of a pickle output ``X.pkl``: ``X.pkl``, ``X_cond.pkl``."""
    output = Path(output)
    return output, output.with_name(f"{output.stem}_cond.pkl")


class ZDCPredictionWriter(BasePredictionWriter):
    """Append every prediction batch to a per-rank part file; merge the parts at the end.

    Args:
        output: ``.h5`` / ``.hdf5`` for rsgm's HDF5 layout, ``.pkl`` for the published pickles.
        merge_rows: rows per block when merging the parts (bounds the merge's memory).
    """

    def __init__(self, output: str, merge_rows: int = 4096) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        if not (is_hdf5(self.output) or self.output.suffix == ".pkl"):
            raise RSGMError(f"--output {output}: name a .h5 (HDF5) or .pkl (published pickle format) file")
        self.merge_rows = merge_rows
        self._writer: HDF5Appender | None = None

    def part_path(self, rank: int) -> Path:
        return self.output.with_name(f".{self.output.name}.part{rank}.h5")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        trainer.predict_loop.return_predictions = False  # the file holds them; memory stays flat
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.part_path(trainer.global_rank).unlink(missing_ok=True)

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(prediction, dict) or "raw_cond" not in prediction or "position" not in prediction:
            raise RSGMError("--output writes ZDC simulators' predictions: use a ConditionalGAN or ExpertSim model "
                            "with rsgm.datamodules.zdc.ZDCDataModule")
        images = prediction["fake"].detach().float().cpu()
        images = images.squeeze(1).numpy() if images.dim() == 4 else images.numpy()
        if self._writer is None:
            shape = tuple(images.shape[1:])
            detector = next((d for d, s in IMAGE_SHAPES.items() if s == shape), "unknown")
            self._writer = HDF5Appender(self.part_path(trainer.global_rank), detector, CONDITION_COLUMNS,
                                        attrs={"model": type(pl_module).__name__})
        fields = {k: prediction[k].cpu().numpy() for k in (*FIELDS, "position") if k in prediction}
        self._writer.append(images, prediction["raw_cond"].cpu().numpy(), **fields)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        trainer.strategy.barrier("zdc_prediction_writer_parts")
        if trainer.is_global_zero:
            parts = [p for p in (self.part_path(r) for r in range(trainer.world_size)) if p.is_file()]
            n = merge_parts(parts, self.output, self.merge_rows)
            rank_zero_info(f"ZDC: wrote {n} simulated responses (photon counts) to {self.output}"
                           + (f" and {pickle_paths(self.output)[1]}" if not is_hdf5(self.output) else ""))
        trainer.strategy.barrier("zdc_prediction_writer_merged")


def _positions(parts: list[Path]) -> list[np.ndarray]:
    out = []
    for p in parts:
        with _h5py().File(p, "r") as f:
            pos = f["position"][...]
        if np.any(np.diff(pos) <= 0):
            raise RuntimeError(f"prediction part {p} is not in increasing output order; the predict loader must not shuffle")
        out.append(pos)
    return out


def merge_parts(parts: list[Path], output: Path, block: int = 4096) -> int:
    """Merge per-rank part files into ``output`` ordered by ``position``; returns the row
    count. Each block of output rows is gathered from the parts' sorted slices, so memory
    is bounded by the block for HDF5 output. The parts are removed afterwards."""
    if not parts:
        raise RuntimeError("no prediction was written: the predict loader was empty")
    positions = _positions(parts)
    every = np.concatenate(positions)
    n = int(every.max()) + 1
    if len(np.unique(every)) != n:
        raise RuntimeError(f"prediction parts cover {len(np.unique(every))} of {n} output rows")
    if len(parts) == 1 and is_hdf5(output):  # one process: already in order, keep the file
        with _h5py().File(parts[0], "a") as f:
            del f["position"]
        os.replace(parts[0], output)
        return n
    files = [_h5py().File(p, "r") for p in parts]
    try:
        first = files[0]
        detector, columns = first.attrs["detector"], list(first.attrs["condition_columns"])
        fields = [k for k in FIELDS if k in first]
        if is_hdf5(output):
            sink = HDF5Appender(output, detector, columns, attrs={"model": first.attrs.get("model", "")})
        else:
            sink = _PickleSink(output, columns)
        with sink:
            for a in range(0, n, block):
                b = min(a + block, n)
                images = np.empty((b - a, *first["images"].shape[1:]), dtype=np.float32)
                cond = np.empty((b - a, len(columns)), dtype=np.float64)
                extra = {k: np.empty(b - a, dtype=np.int64) for k in fields}
                for f, pos in zip(files, positions):
                    lo, hi = np.searchsorted(pos, a), np.searchsorted(pos, b)
                    if lo == hi:
                        continue
                    rows = pos[lo:hi] - a
                    images[rows] = f["images"][lo:hi]
                    for k, c in enumerate(columns):
                        cond[rows, k] = f[f"conditions/{c}"][lo:hi]
                    for k in fields:
                        extra[k][rows] = f[k][lo:hi]
                sink.append(images, cond, **extra)
    finally:
        for f in files:
            f.close()
    for p in parts:
        p.unlink()
    return n


class _PickleSink:
    """Collects the merged rows and writes the published pickle pair on close."""

    def __init__(self, output: Path, columns: list[str]) -> None:
        self.output, self.columns = output, columns
        self.images: list[np.ndarray] = []
        self.rows: list[pd.DataFrame] = []

    def append(self, images: np.ndarray, conditions: np.ndarray, **fields: np.ndarray) -> None:
        self.images.append(images)
        self.rows.append(pd.DataFrame({**{c: conditions[:, k] for k, c in enumerate(self.columns)}, **fields}))

    def __enter__(self) -> "_PickleSink":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            return
        image_path, cond_path = pickle_paths(self.output)
        pd.to_pickle(np.concatenate(self.images), image_path)
        pd.concat(self.rows, ignore_index=True).to_pickle(cond_path)


def read_predictions(path: str | Path) -> tuple[np.ndarray, pd.DataFrame]:
    """Images and the condition / bookkeeping table of a written prediction file."""
    path = Path(path)
    if is_hdf5(path):
        with _h5py().File(path, "r") as f:
            images = f["images"][...]
            columns = list(f.attrs["condition_columns"])
            table = pd.DataFrame({c: f[f"conditions/{c}"][...] for c in columns})
            for k in FIELDS:
                if k in f:
                    table[k] = f[k][...]
        return images, table
    from rsgm.physics.zdc_files import read_pickle

    image_path, cond_path = pickle_paths(path)
    return read_pickle(image_path, "image"), read_pickle(cond_path, "conditions")


__all__ = ["ZDCPredictionWriter", "merge_parts", "pickle_paths", "read_predictions"]
