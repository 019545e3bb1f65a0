"""Channel-W1 evaluation of ZDC simulators, every validation epoch and at test.

Expects the LightningModule's ``validation_step`` / ``test_step`` to return a dict with
photon-count images ``real`` and ``fake`` (paired by condition) and ``index``. Logs
``{val,test}/w1_mean``, ``/w1_ch1..5`` and ``/w1_q1..4`` (intensity quartiles); saves the
five channel histograms (real vs generated) and a grid of real and generated responses.
At test it also writes ``test_channel_w1.json`` into the run folder.

At test (not at validation, to keep training cheap) it also logs the CaloChallenge-style
fidelity of ``rsgm.metrics.fidelity``: ``test/auc_low`` and ``test/auc_high``, the AUC of a
classifier two-sample test on the pixels (``log1p`` photon counts) and on the 10 high-level
features (with ``_err``, ``_ece`` and ``_brier``), and ``test/fpd`` / ``test/kpd`` on the
high-level features (with ``_err``).
"""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from rsgm.callbacks.evaluation import SplitEvaluation
from rsgm.metrics.fidelity import ClassifierAUC, PhysicsDistances, condition_ids, high_level_features
from rsgm.metrics.wasserstein import ChannelWasserstein
from rsgm.physics.channels import CHANNEL_NAMES, QUADRANTS, ChannelLayout
from rsgm.utils.figures import plt, save_figure


def channel_histogram_figure(real: np.ndarray, fake: np.ndarray, title: str) -> plt.Figure:
    """Five panels of real vs generated channel-value histograms on a log1p axis."""
    fig, axes = plt.subplots(1, 5, figsize=(18, 3.2))
    for c, ax in enumerate(axes):
        top = max(real[:, c].max(), fake[:, c].max(), 1.0)
        bins = np.expm1(np.linspace(0, np.log1p(top), 40))
        ax.hist(real[:, c], bins=bins, alpha=0.5, label="real", color="tab:blue")
        ax.hist(fake[:, c], bins=bins, alpha=0.5, label="generated", color="tab:orange")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_yscale("log")
        ax.set_title(CHANNEL_NAMES[c])
        ax.set_xlabel("photons")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def sample_grid_figure(real: np.ndarray, fake: np.ndarray, title: str) -> plt.Figure:
    """Real responses (top row) above the generated ones for the same conditions."""
    n = len(real)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.6), squeeze=False)
    for k in range(n):
        top = max(real[k].max(), fake[k].max(), 1.0)
        for row, img in enumerate((real[k], fake[k])):
            axes[row, k].imshow(np.log1p(img), vmin=0, vmax=np.log1p(top), cmap="magma")
            axes[row, k].axis("off")
    axes[0, 0].set_title("real", loc="left", fontsize=9)
    axes[1, 0].set_title("generated", loc="left", fontsize=9)
    fig.suptitle(title)
    return fig


class ChannelWassersteinCallback(SplitEvaluation):
    """Args:
        quadrant_parity, quadrant_order: the PMT mask layout (see ``rsgm.physics.channels``).
        quartile_edges: 5 fixed photon-sum edges for the quartile table; default: the
            quartiles of the evaluated real responses.
        plot_every_n_epochs: validation plots every this many epochs (0 = only at test).
        n_grid: responses shown in the sample grid.
        fidelity: also compute the classifier AUCs, FPD and KPD at test.
        classifier: keyword arguments of ``rsgm.metrics.fidelity.classifier_auc`` (default:
            at most 5,000 responses per side, at most 20 epochs, early stopping after 5).
        fpd, kpd: keyword arguments of ``frechet_physics_distance`` / ``kernel_physics_distance``.
    """

    test_file = "test_channel_w1.json"

    def __init__(self, quadrant_parity: int = 1, quadrant_order: tuple[str, str, str, str] = QUADRANTS,
                 quartile_edges: list[float] | None = None, plot_every_n_epochs: int = 1, n_grid: int = 8,
                 fidelity: bool = True, classifier: dict | None = None, fpd: dict | None = None,
                 kpd: dict | None = None) -> None:
        super().__init__(plot_every_n_epochs)
        self.fidelity = fidelity
        self.fidelity_args = {"classifier": {"max_samples": 5000, "epochs": 20, "patience": 5, **(classifier or {})},
                              "fpd": dict(fpd or {}), "kpd": dict(kpd or {})}
        self.fidelity_metrics: dict[str, ClassifierAUC | PhysicsDistances] = {}
        self.layout = ChannelLayout(quadrant_parity, tuple(quadrant_order))
        self.quartile_edges = quartile_edges
        self.n_grid = n_grid
        self.metrics: dict[str, ChannelWasserstein] = {}
        self.grid: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        shape = getattr(trainer.datamodule, "image_shape", None)
        if shape is None:
            raise ValueError("ChannelWassersteinCallback needs a datamodule with an image_shape (e.g. ZDCDataModule)")
        for split in ("val", "test"):
            self.metrics[split] = ChannelWasserstein(shape, self.layout, self.quartile_edges).to(pl_module.device)
        if self.fidelity:
            classifier = self.fidelity_args["classifier"]
            self.fidelity_metrics = {
                "low": ClassifierAUC(classifier).to(pl_module.device), "high": ClassifierAUC(classifier).to(pl_module.device),
                "dist": PhysicsDistances(self.fidelity_args["fpd"], self.fidelity_args["kpd"]).to(pl_module.device)}

    def update(self, split: str, outputs: dict[str, torch.Tensor]) -> None:
        self.metrics[split].update(outputs["real"], outputs["fake"], outputs["index"])
        if split == "test" and self.fidelity_metrics:
            real, fake, index = outputs["real"], outputs["fake"], outputs["index"]
            masks = self.metrics[split].masks
            # Repeated particles stay on one side of the classifier's own split.
            group = condition_ids(outputs["batch"]["cond"]) if "batch" in outputs else None
            self.fidelity_metrics["low"].update(real.float().log1p(), fake.float().log1p(), index, group)
            high = (high_level_features(real, masks).float(), high_level_features(fake, masks).float(), index, group)
            self.fidelity_metrics["high"].update(*high)
            self.fidelity_metrics["dist"].update(*high)
        if split not in self.grid:
            k = self.n_grid
            self.grid[split] = (outputs["real"][:k, 0].cpu().numpy(), outputs["fake"][:k, 0].cpu().numpy())

    def finish(self, split: str, trainer: Trainer, pl_module: LightningModule, plot: bool) -> dict[str, float]:
        result = self.metrics[split].compute()
        scalars = {f"{split}/w1_mean": float(result["w1_mean"])}
        scalars.update({f"{split}/w1_{name}": float(v) for name, v in zip(CHANNEL_NAMES, result["w1"])})
        scalars.update({f"{split}/w1_q{q + 1}": float(v) for q, v in enumerate(result["w1_quartiles"])})
        # Computed from states gathered on every rank: identical values, so sync_dist only averages equals.
        pl_module.log_dict(scalars, prog_bar=False, sync_dist=True)
        pl_module.log(f"{split}_w1", scalars[f"{split}/w1_mean"], prog_bar=True, logger=False, sync_dist=True)
        if plot:
            tag = f"{split} epoch {trainer.current_epoch}"
            save_figure(trainer, channel_histogram_figure(result["real"].cpu().numpy(), result["fake"].cpu().numpy(),
                                                          f"channel values, {tag}"), f"{split}_channels_epoch{trainer.current_epoch:03d}")
            real, fake = self.grid[split]
            save_figure(trainer, sample_grid_figure(real, fake, f"responses, {tag}"), f"{split}_samples_epoch{trainer.current_epoch:03d}")
        self.metrics[split].reset()
        self.grid.pop(split, None)
        if split == "test" and self.fidelity_metrics:
            try:
                fidelity = self.fidelity_scalars()
            except ValueError as err:  # e.g. a test split too small for the classifier's three-way split
                rank_zero_warn(f"classifier AUC / FPD / KPD skipped: {err}")
                fidelity = {}
            for metric in self.fidelity_metrics.values():
                metric.reset()
            pl_module.log_dict(fidelity, prog_bar=False, sync_dist=True)  # from gathered states: equal on every rank
            scalars.update(fidelity)
        scalars[f"{split}/quartile_edges"] = [float(e) for e in result["quartile_edges"]]
        return scalars

    def fidelity_scalars(self) -> dict[str, float]:
        out = {}
        for level in ("low", "high"):
            auc = self.fidelity_metrics[level].compute()
            out.update({f"test/auc_{level}": auc["auc"], f"test/auc_{level}_err": auc["auc_err"],
                        f"test/auc_{level}_ece": auc["ece"], f"test/auc_{level}_brier": auc["brier"]})
        dist = self.fidelity_metrics["dist"].compute()
        return {**out, **{f"test/{k}": v for k, v in dist.items()}}
