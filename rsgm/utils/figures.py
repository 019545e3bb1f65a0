"""Saving plots into the run folder and logging them to W&B."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs happen on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.loggers import WandbLogger  # noqa: E402

from rsgm.utils.dashboard import log_step  # noqa: E402


def run_dir(trainer: Trainer) -> Path:
    """The folder where a run keeps its artefacts (config, plots, tables, checkpoints).

    Read from the logger directly: ``trainer.log_dir`` broadcasts across DDP ranks and
    would hang when only rank 0 asks."""
    for logger in trainer.loggers:
        folder = getattr(logger, "log_dir", None) or logger.save_dir
        if folder:
            return Path(folder)
    return Path(trainer.default_root_dir)


def save_figure(trainer: Trainer, fig: plt.Figure, name: str) -> Path | None:
    """Write ``fig`` to ``<run dir>/plots/<name>.png`` and log it to W&B when W&B is a logger.

    Only global rank 0 writes; other ranks close the figure and return ``None``.
    """
    if not trainer.is_global_zero:
        plt.close(fig)
        return None
    path = run_dir(trainer) / "plots" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=f"plots/{name}", images=[str(path)], step=log_step(trainer))
    return path


def save_roc_figure(trainer: Trainer, curves: dict[str, tuple], fpr: float, title: str, name: str,
                    fontsize: int = 7) -> Path | None:
    """Log-log ROC curves (label -> (fpr, tpr) tensors or arrays), the chance diagonal and a
    line at the reported FPR, saved and logged as ``name``."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(5, 4.5))
    for label, (f, t) in curves.items():
        ax.plot(np.clip(np.asarray(f), 1e-4, 1), np.clip(np.asarray(t), 1e-4, 1), label=label)
    ax.plot([1e-4, 1], [1e-4, 1], "k:", lw=0.8)
    ax.axvline(fpr, color="grey", lw=0.6)
    ax.set(xscale="log", yscale="log", xlabel="FPR", ylabel="TPR", title=title)
    ax.legend(fontsize=fontsize)
    fig.tight_layout()
    return save_figure(trainer, fig, name)
