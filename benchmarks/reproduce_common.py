"""Shared printing for ``benchmarks/reproduce_ch*.py``: thesis number beside rsgm's."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mean_std(values: Sequence[float], digits: int | None = None) -> str:
    """``mean ± std`` (sample std, ddof=1) of the values over seeds; a single value alone."""
    a = np.asarray([v for v in values if v is not None], dtype=float)
    if a.size == 0:
        return "n/a"
    if digits is None:
        digits = 1 if abs(a.mean()) >= 10 else 2 if abs(a.mean()) >= 0.1 else 3
    if a.size == 1:
        return f"{a[0]:.{digits}f}"
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1):.{digits}f}"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]], note: str = "") -> str:
    """Print (and return) a Markdown table: ``header`` then ``rows``, each cell ``str()``-ed."""
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    if note:
        lines += ["", note]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text
