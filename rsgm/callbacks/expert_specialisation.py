"""Per-expert evaluation of ExpertSim (thesis Table 5.5.1).

Expects ``validation_step`` / ``test_step`` outputs with photon-count images ``real`` and
``fake``, the routed ``expert`` id of every sample and its ``index`` (what
``ExpertSim.generate`` returns). For every expert it logs the share of samples routed to
it, the mean and std intensity (photon sum) of the responses it generated, and the mean
intensity of the real responses of the conditions routed to it, which shows whether the
router sends different conditions to different experts:
``{val,test}/expert<i>_share``, ``_mean_intensity``, ``_std_intensity``,
``_real_mean_intensity``. It plots the five
channel histograms per expert (its generated responses against the real responses of the
same conditions), and at test writes ``test_experts.json`` into the run folder.
Use it beside :class:`~rsgm.callbacks.channel_wasserstein.ChannelWassersteinCallback`.
"""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer

from rsgm.callbacks.evaluation import SplitEvaluation
from rsgm.metrics.gather import GatheredSamples
from rsgm.physics.channels import CHANNEL_NAMES, QUADRANTS, ChannelLayout, channel_masks, channel_values
from rsgm.utils.figures import plt, save_figure


def expert_statistics(expert: torch.Tensor, intensity: torch.Tensor, n_experts: int,
                      real_intensity: torch.Tensor | None = None) -> list[dict[str, float]]:
    """Per expert: ``share`` of samples routed to it, ``n``, and the ``mean`` / ``std``
    (population) of the intensities of its samples (NaN for an unused expert); with
    ``real_intensity``, also the ``real_mean_intensity`` of its samples."""
    if len(expert) != len(intensity):
        raise ValueError(f"{len(expert)} expert ids for {len(intensity)} intensities")
    if real_intensity is not None and len(real_intensity) != len(expert):
        raise ValueError(f"{len(expert)} expert ids for {len(real_intensity)} real intensities")
    if len(expert) == 0:
        raise ValueError("no evaluated samples: the per-expert statistics need at least one")
    rows = []
    for i in range(n_experts):
        mine = expert == i
        values = intensity[mine].double()
        n = len(values)
        rows.append({"expert": i, "n": n, "share": n / len(expert),
                     "mean_intensity": float(values.mean()) if n else float("nan"),
                     "std_intensity": float(values.std(unbiased=False)) if n else float("nan")})
        if real_intensity is not None:
            rows[-1]["real_mean_intensity"] = float(real_intensity[mine].double().mean()) if n else float("nan")
    return rows


def expert_histogram_figure(real: np.ndarray, fake: np.ndarray, expert: np.ndarray, n_experts: int, title: str) -> plt.Figure:
    """One row per expert, five channel panels: generated vs real values of its conditions."""
    fig, axes = plt.subplots(n_experts, 5, figsize=(18, 2.6 * n_experts), squeeze=False)
    for c in range(5):
        top = max(real[:, c].max(initial=1.0), fake[:, c].max(initial=1.0))
        bins = np.expm1(np.linspace(0, np.log1p(top), 40))
        for i in range(n_experts):
            ax, mine = axes[i, c], expert == i
            ax.hist(real[mine, c], bins=bins, alpha=0.5, label="real", color="tab:blue")
            ax.hist(fake[mine, c], bins=bins, alpha=0.5, label=f"expert {i}", color=f"C{(i + 1) % 10}")
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_yscale("log")
            if i == 0:
                ax.set_title(CHANNEL_NAMES[c])
            if c == 0:
                ax.set_ylabel(f"expert {i} ({mine.mean():.0%})")
                ax.legend(fontsize=7)
    axes[-1, 2].set_xlabel("photons")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


class ExpertSpecialisationCallback(SplitEvaluation):
    """Args:
        quadrant_parity, quadrant_order: the PMT mask layout (see ``rsgm.physics.channels``).
        plot_every_n_epochs: validation plots every this many epochs (0 = only at test).
    """

    test_file = "test_experts.json"

    def __init__(self, quadrant_parity: int = 1, quadrant_order: tuple[str, str, str, str] = QUADRANTS,
                 plot_every_n_epochs: int = 1) -> None:
        super().__init__(plot_every_n_epochs)
        self.layout = ChannelLayout(quadrant_parity, tuple(quadrant_order))
        self.samples: dict[str, GatheredSamples] = {}
        self.masks: torch.Tensor | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        n = pl_module.hparams.get("n_experts")
        if n is None:
            raise ValueError("ExpertSpecialisationCallback needs a model with an n_experts hyperparameter (ExpertSim)")
        shape = getattr(trainer.datamodule, "image_shape", None)
        if shape is None:
            raise ValueError("ExpertSpecialisationCallback needs a datamodule with an image_shape (e.g. ZDCDataModule)")
        self.n_experts = int(n)
        self.masks = channel_masks(*shape, self.layout).to(pl_module.device)
        for split in ("val", "test"):
            self.samples[split] = GatheredSamples(["expert", "intensity", "real_intensity", "real", "fake"]).to(pl_module.device)

    def update(self, split: str, outputs: dict[str, torch.Tensor]) -> None:
        if "expert" not in outputs:
            raise ValueError("ExpertSpecialisationCallback needs evaluation outputs with an 'expert' id per sample (ExpertSim)")
        self.samples[split].update(outputs["index"], expert=outputs["expert"],
                                   intensity=outputs["fake"].flatten(1).double().sum(1),
                                   real_intensity=outputs["real"].flatten(1).double().sum(1),
                                   real=channel_values(outputs["real"], self.masks),
                                   fake=channel_values(outputs["fake"], self.masks))

    def finish(self, split: str, trainer: Trainer, pl_module: LightningModule, plot: bool) -> list[dict[str, float]]:
        got = self.samples[split].compute()
        self.samples[split].reset()
        rows = expert_statistics(got["expert"], got["intensity"], self.n_experts, got["real_intensity"])
        scalars = {}
        for r in rows:
            i = r["expert"]
            scalars.update({f"{split}/expert{i}_share": r["share"], f"{split}/expert{i}_mean_intensity": r["mean_intensity"],
                            f"{split}/expert{i}_std_intensity": r["std_intensity"],
                            f"{split}/expert{i}_real_mean_intensity": r["real_mean_intensity"]})
        pl_module.log_dict(scalars, sync_dist=True)  # from gathered states: equal on every rank
        if plot:
            fig = expert_histogram_figure(got["real"].cpu().numpy(), got["fake"].cpu().numpy(), got["expert"].cpu().numpy(),
                                          self.n_experts, f"channel values per expert, {split} epoch {trainer.current_epoch}")
            save_figure(trainer, fig, f"{split}_expert_channels_epoch{trainer.current_epoch:03d}")
        return rows
