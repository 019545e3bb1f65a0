"""ZDC response files: checks, the published pickles, and rsgm's HDF5 layout.

HDF5 layout (written by ``rsgm predict --output X.h5`` and ``rsgm convert-zdc``, read by
``ZDCDataModule``); one dataset per field, chunked and gzip-compressed:

==================  ===========  ==================================================
dataset             dtype        meaning
==================  ===========  ==================================================
``images``          float32      ``(N, H, W)`` responses in photon counts
``conditions/<c>``  float64      ``(N,)`` one per condition column (``Energy`` ...)
``index``           int64        (predictions) row of the condition in its source
``sample``          int64        (predictions) 0..K-1 when K samples per condition
``expert``          int64        (ExpertSim predictions) the expert that generated it
==================  ===========  ==================================================

Root attributes: ``format`` (``rsgm-zdc-1``), ``detector``, ``units`` (``photons``) and
``condition_columns``.

Published pickles are read with ``pandas.read_pickle`` only, the single documented
exception to rsgm's rule that nothing it opens may run code: a pickle can execute code
when loaded, so they must come from a trusted source (convert them once to HDF5).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from rsgm.errors import RSGMError
from rsgm.physics.simulator import CONDITION_COLUMNS, IMAGE_SHAPES

FORMAT = "rsgm-zdc-1"
HDF5_SUFFIXES = (".h5", ".hdf5")
FLOAT32_MAX = float(np.finfo(np.float32).max)
_trust_note_said = False


def say_pickle_trust_once(log) -> None:
    """Log, once per process, that pickles run code when loaded."""
    global _trust_note_said
    if not _trust_note_said:
        _trust_note_said = True
        log("ZDC: pickle files can run code when loaded; read only pickles from a trusted source "
            "(convert them once to HDF5 with `rsgm convert-zdc SRC DST.h5`)")


def is_hdf5(path: str | Path) -> bool:
    return Path(path).suffix.lower() in HDF5_SUFFIXES


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise RSGMError(f"ZDC {what} file '{path}' does not exist")
    if path.stat().st_size == 0:
        raise RSGMError(f"ZDC {what} file '{path}' is empty; copy it again from the source")
    return path


def read_pickle(path: str | Path, what: str):
    """``pandas.read_pickle`` with the file named in every error (empty, truncated, not a pickle)."""
    path = _existing(path, what)
    try:
        return pd.read_pickle(path)
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, ImportError, OSError) as err:
        raise RSGMError(f"ZDC {what} file '{path}' could not be read as a pickle ({type(err).__name__}: {err}); "
                        "it is truncated or of another format") from None


def _h5py():
    import h5py

    return h5py


def _open_hdf5(path: str | Path, what: str):
    path = _existing(path, what)
    try:
        return _h5py().File(path, "r")
    except OSError as err:
        raise RSGMError(f"ZDC {what} file '{path}' is not a readable HDF5 file ({err}); it is truncated or of another format") from None


def read_hdf5_conditions(path: str | Path, what: str = "conditions") -> pd.DataFrame:
    """The ``conditions/<column>`` datasets of an rsgm HDF5 file as a DataFrame."""
    with _open_hdf5(path, what) as f:
        if "conditions" not in f:
            raise RSGMError(f"ZDC {what} file '{path}' has no 'conditions' group; expected rsgm's HDF5 layout "
                            "(write it with `rsgm convert-zdc`)")
        group = f["conditions"]
        columns = list(f.attrs.get("condition_columns", list(group.keys())))
        return pd.DataFrame({c: group[c][...] for c in columns if c in group}, columns=[c for c in columns if c in group])


def read_hdf5(path: str | Path) -> tuple[np.ndarray, pd.DataFrame]:
    """Images (as stored) and conditions of an rsgm HDF5 file."""
    with _open_hdf5(path, "image") as f:
        if "images" not in f:
            raise RSGMError(f"ZDC file '{path}' has no 'images' dataset; expected rsgm's HDF5 layout")
        images = f["images"][...]
    return images, read_hdf5_conditions(path, "image")


def read_conditions(path: str | Path) -> pd.DataFrame:
    """Conditions from a published-format pickle (a DataFrame) or an rsgm HDF5 file."""
    if is_hdf5(path):
        table = read_hdf5_conditions(path)
    else:
        table = read_pickle(path, "conditions")
    if not isinstance(table, pd.DataFrame):
        raise RSGMError(f"ZDC conditions file '{path}' holds a {type(table).__name__}, expected a pandas DataFrame "
                        f"with the columns {list(CONDITION_COLUMNS)}")
    return table


# -- checks --------------------------------------------------------------------------------
def check_conditions(table: pd.DataFrame, source: str) -> np.ndarray:
    """The ``(N, 9)`` float64 condition array, or a one-line RSGMError naming file and column."""
    if not isinstance(table, pd.DataFrame):
        raise RSGMError(f"{source}: conditions must be a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in CONDITION_COLUMNS if c not in table.columns]
    if missing:
        raise RSGMError(f"{source}: conditions lack the columns {missing}; expected {list(CONDITION_COLUMNS)}")
    if len(table) == 0:
        raise RSGMError(f"{source}: the condition table is empty")
    try:
        values = table[list(CONDITION_COLUMNS)].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise RSGMError(f"{source}: condition columns must be numeric ({err})") from None
    for what, bad in (("NaN", np.isnan(values)), ("inf", np.isinf(values)),
                      ("values beyond float32's range", np.isfinite(values) & (np.abs(values) > FLOAT32_MAX))):
        cols = [c for c, b in zip(CONDITION_COLUMNS, bad.any(axis=0)) if b]
        if cols:
            raise RSGMError(f"{source}: conditions contain {what} in columns {cols} ({int(bad.sum())} values); "
                            "remove or fix those rows")
    return values


def check_images(images: np.ndarray, detector: str, source: str) -> np.ndarray:
    """Images as float32 photon counts, or a one-line RSGMError naming the file."""
    expected = IMAGE_SHAPES[detector]
    if not isinstance(images, np.ndarray) or images.ndim != 3 or tuple(images.shape[1:]) != expected:
        shape = getattr(images, "shape", type(images).__name__)
        raise RSGMError(f"{source}: images have shape {shape}, expected (N, {expected[0]}, {expected[1]}) for the {detector} detector")
    if len(images) == 0:
        raise RSGMError(f"{source}: the data set is empty")
    if not (np.issubdtype(images.dtype, np.number) or images.dtype == bool):
        raise RSGMError(f"{source}: images have dtype {images.dtype}, expected numbers (photon counts)")
    wide = images.astype(np.float64, copy=False) if images.dtype != np.float64 else images
    checks = (("NaN pixel values", np.isnan), ("inf pixel values", np.isinf),
              ("pixel values beyond float32's range", lambda a: np.isfinite(a) & (np.abs(a) > FLOAT32_MAX)),
              ("negative photon counts", lambda a: a < 0))
    for what, test in checks:
        n_bad = int(test(wide).sum())
        if n_bad:
            raise RSGMError(f"{source}: images contain {n_bad} {what}; fix or drop those images")
    return images.astype(np.float32, copy=False)


def pair_by_index(table: pd.DataFrame, n_images: int, source: str) -> pd.DataFrame:
    """Conditions reordered so that row ``i`` belongs to image ``i``: the DataFrame's index
    must be a permutation of ``0..N-1`` (the published files pair by index)."""
    if len(table) != n_images:
        raise RSGMError(f"{source}: {n_images} images but {len(table)} condition rows")
    index = table.index.to_numpy()
    if isinstance(table.index, pd.RangeIndex) and table.index.start == 0 and table.index.step == 1:
        return table
    if not np.issubdtype(index.dtype, np.integer) or not np.array_equal(np.sort(index), np.arange(n_images)):
        raise RSGMError(f"{source}: the conditions' index is not a permutation of 0..{n_images - 1}, so conditions "
                        "cannot be paired with images; reset it with DataFrame.reset_index(drop=True) if the rows are "
                        "already in image order")
    return table.sort_index()


def validate_zdc(images: np.ndarray, conditions: pd.DataFrame, detector: str,
                 source: str = "ZDC data") -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """All checks; returns float32 images, conditions paired by index, and their ``(N, 9)`` array."""
    images = check_images(images, detector, source)
    if not isinstance(conditions, pd.DataFrame):
        raise RSGMError(f"{source}: conditions must be a pandas DataFrame, got {type(conditions).__name__}")
    conditions = pair_by_index(conditions, len(images), source)
    return images, conditions, check_conditions(conditions, source)


# -- writing -------------------------------------------------------------------------------
class HDF5Appender:
    """Append rows to an rsgm HDF5 file; every field is a resizable, chunked, compressed
    dataset, so memory does not grow with the number of rows."""

    def __init__(self, path: str | Path, detector: str, columns: Iterable[str] = CONDITION_COLUMNS,
                 chunk_rows: int = 64, attrs: dict | None = None) -> None:
        self.path, self.chunk_rows = Path(path), chunk_rows
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = _h5py().File(self.path, "w")
        self.columns = list(columns)
        self.file.attrs.update({"format": FORMAT, "detector": detector, "units": "photons",
                                "condition_columns": self.columns, **(attrs or {})})
        self.file.create_group("conditions")
        self.n = 0

    def _dataset(self, name: str, row_shape: tuple[int, ...], dtype) -> "object":
        if name not in self.file:
            self.file.create_dataset(name, shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=dtype,
                                     chunks=(self.chunk_rows, *row_shape), compression="gzip", compression_opts=4,
                                     shuffle=True)
        return self.file[name]

    def append(self, images: np.ndarray, conditions: np.ndarray, **fields: np.ndarray) -> None:
        """``images`` ``(B, H, W)`` photon counts, ``conditions`` ``(B, len(columns))``, and
        further per-row fields (``index``, ``sample``, ``expert``...)."""
        b = len(images)
        rows = {"images": np.asarray(images, dtype=np.float32)}
        rows.update({f"conditions/{c}": np.asarray(conditions[:, k], dtype=np.float64) for k, c in enumerate(self.columns)})
        rows.update({k: np.asarray(v, dtype=np.int64) for k, v in fields.items()})
        for name, value in rows.items():
            if len(value) != b:
                raise ValueError(f"field {name} has {len(value)} rows, images have {b}")
            ds = self._dataset(name, value.shape[1:], value.dtype)
            ds.resize(self.n + b, axis=0)
            ds[self.n:] = value
        self.n += b

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "HDF5Appender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def convert_pickles_to_hdf5(images_path: str | Path, conditions_path: str | Path, out: str | Path,
                            detector: str | None = None, log=print) -> Path:
    """One-time conversion of a published image / condition pickle pair to rsgm's HDF5
    layout, after every check ``ZDCDataModule`` makes. Returns the output path."""
    say_pickle_trust_once(log)
    images = read_pickle(images_path, "image")
    if isinstance(images, pd.DataFrame):
        images = images.to_numpy()
    if detector is None:
        shape = tuple(getattr(images, "shape", ())[1:])
        matches = [d for d, s in IMAGE_SHAPES.items() if s == shape]
        if not matches:
            raise RSGMError(f"{images_path}: images have shape {getattr(images, 'shape', None)}, not a ZDC detector "
                            f"({', '.join(f'{d} {s}' for d, s in IMAGE_SHAPES.items())})")
        detector = matches[0]
    table = read_pickle(conditions_path, "conditions")
    images, table, cond = validate_zdc(images, table, detector, f"{images_path} + {conditions_path}")
    with HDF5Appender(out, detector) as writer:
        for start in range(0, len(images), 4096):
            writer.append(images[start:start + 4096], cond[start:start + 4096])
    log(f"ZDC: wrote {len(images)} {detector} responses to {out}")
    return Path(out)


def convert_main(argv: list[str]) -> None:
    """``rsgm convert-zdc SRC DST.h5``: SRC is a folder holding one published image /
    condition pickle pair (or the image pickle, with ``--conditions``)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="rsgm convert-zdc", description=convert_main.__doc__.splitlines()[0])
    parser.add_argument("src", help="folder of the published pickles, or the image pickle")
    parser.add_argument("dst", help="the HDF5 file to write (.h5)")
    parser.add_argument("--conditions", default=None, help="the condition pickle when SRC is the image pickle")
    parser.add_argument("--detector", choices=sorted(IMAGE_SHAPES), default=None, help="default: from the image shape")
    args = parser.parse_args(argv)
    try:
        if not is_hdf5(args.dst):
            raise RSGMError(f"convert-zdc: the output '{args.dst}' must end in .h5 or .hdf5")
        src = Path(args.src)
        if src.is_dir():
            pattern = f"data_{args.detector or '*'}_photonsum_*.pkl"
            images = [p for p in sorted(src.glob(pattern)) if not p.name.startswith("data_cond_")]
            conds = sorted(src.glob(f"data_cond_photonsum_{args.detector or '*'}_*.pkl"))
            if len(images) != 1 or len(conds) != 1:
                raise RSGMError(f"convert-zdc: '{src}' holds {len(images)} image and {len(conds)} condition pickles; "
                                "pass the image pickle and --conditions explicitly")
            image_path, cond_path = images[0], Path(args.conditions) if args.conditions else conds[0]
        elif args.conditions:
            image_path, cond_path = src, Path(args.conditions)
        else:
            raise RSGMError(f"convert-zdc: '{src}' is not a folder; pass the image pickle with --conditions COND.pkl")
        convert_pickles_to_hdf5(image_path, cond_path, args.dst, args.detector)
    except RSGMError as err:
        sys.exit(f"rsgm: {err}")
