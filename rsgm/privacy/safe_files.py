"""Files that rsgm writes and reads back (feature caches, score files, p-values) in a plain
format that cannot run code: safetensors with a JSON header.

Layout: the tensors as safetensors entries, plus string metadata ``format`` (the kind of
file, e.g. ``rsgm.features``), ``version`` (an integer, :data:`VERSION`) and ``meta`` (a
JSON object: names, configuration). Reading checks the format, the version, the required
tensors and their shapes, and raises :class:`rsgm.errors.RSGMError` with one line on any
mismatch. Older ``.pt`` caches are read with ``torch.load(weights_only=True)`` only, so a
pickle that would run code is refused, never executed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from rsgm.errors import RSGMError

VERSION = 1


def save_tensors(path: str | Path, kind: str, tensors: dict[str, Tensor], meta: dict | None = None) -> Path:
    """Write ``tensors`` (contiguous CPU copies) and ``meta`` (JSON-able) to ``path`` as safetensors."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(data, str(path), metadata={"format": kind, "version": str(VERSION), "meta": json.dumps(meta or {})})
    return path


def load_tensors(path: str | Path, kind: str, required: tuple[str, ...] = ()) -> tuple[dict[str, Tensor], dict]:
    """Read a file written by :func:`save_tensors`; returns ``(tensors, meta)``.

    Refuses (RSGMError, one line) a missing file, a file that is not safetensors, another
    ``format``, another ``version`` and missing tensors. Never executes anything from the file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise RSGMError(f"file '{path}' not found; pass a {kind} file written by an earlier rsgm run.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise RSGMError(f"'{path}' is not a safetensors file ({type(err).__name__}); pass a {kind} file written by rsgm.") from None
    if header.get("format") != kind:
        raise RSGMError(f"'{path}' holds format '{header.get('format')}', expected '{kind}'; pass the right file.")
    if header.get("version") != str(VERSION):
        raise RSGMError(f"'{path}' has {kind} version {header.get('version')}, this rsgm reads version {VERSION}; re-create it with this rsgm.")
    try:
        meta = json.loads(header.get("meta", "{}"))
    except json.JSONDecodeError:
        raise RSGMError(f"'{path}' has unreadable metadata; re-create it with rsgm.") from None
    missing = [k for k in required if k not in tensors]
    if missing:
        raise RSGMError(f"'{path}' lacks tensors {missing}; re-create it with rsgm.")
    return tensors, meta


def load_legacy_pt(path: str | Path, what: str) -> dict:
    """Read an old ``.pt`` file with ``weights_only=True``: plain tensors, lists, dicts and
    strings load, anything that would run code is refused with one line."""
    import pickle

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RSGMError(f"refused to load '{path}' as a {what}: it is not plain tensor data ({first[:120]}); "
                        "only files written by rsgm are read, and never by running code.") from None
    if not isinstance(data, dict):
        raise RSGMError(f"'{path}' holds a {type(data).__name__}, not a {what}; pass a file written by rsgm.")
    return data
