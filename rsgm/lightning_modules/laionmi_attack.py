"""Membership attacks of thesis ch. 7 (Table 7.7.1, App. B.4) on one or several diffusion targets.

``rsgm test --config configs/laionmi_sd14.yaml``: ``test_step`` runs every configured attack
method (:mod:`rsgm.privacy.laionmi_attacks`) on the batch through the target adapter and
collects the per-step signals (model loss, latent error, pixel error; mean over ``passes``
noise draws) in "cat" metrics, gathered across DDP ranks. At test end the signals are saved
as ``laionmi_signals.pt`` and left in ``self.results``; the report callback
(:class:`rsgm.callbacks.laionmi.LaionMIReport`) evaluates the threshold and classifier
attacks over the random evaluation subsets.

Several targets (``targets: {name: target}``) are attacked on the same batches; a batch may
carry ``membership`` (B, n_targets) with each target's own labels (-1: not evaluated for
that target), as the offline pitfall experiment does.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch import nn

from rsgm.components.diffusion_adapters import DiffusionTarget
from rsgm.metrics.membership import MembershipFeatures
from rsgm.privacy.laionmi_attacks import ChainConfig, attack_methods, method_signals, signal_names
from rsgm.utils.figures import run_dir

TABLE_7_7_1 = ["baseline_loss", "reversed_noising", "partial_denoising", "reversed_denoising",
               "generation_grey_box", "generation_black_box"]


class LaionMIAttack(LightningModule):
    """Args:
        targets: name -> the attacked model behind the adapter protocol.
        methods: attack methods (names of :func:`attack_methods`); default: those of Table 7.7.1.
        passes: noise draws averaged per signal (5 in the thesis).
        reversed_guidance: CFG scale of "reversed noising" (100).
        latent_shift, generation_steps, generation_guidance, seed: see :class:`ChainConfig`.
        subsets, subset_size: evaluation protocol when the datamodule fixes none (100 x 500).
    """

    def __init__(self, targets: dict[str, DiffusionTarget], methods: list[str] | None = None, passes: int = 5,
                 reversed_guidance: float = 100.0, latent_shift: float = 0.1, generation_steps: int = 50,
                 generation_guidance: float = 7.5, seed: int = 0, subsets: int = 100, subset_size: int = 500) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["targets"])
        if not targets:
            raise ValueError("LaionMIAttack needs at least one target (model.init_args.targets: {name: target}).")
        known = attack_methods(reversed_guidance)
        unknown = set(methods or []) - set(known)
        if unknown:
            raise ValueError(f"unknown LAION-mi attack methods {sorted(unknown)}; choose from {sorted(known)}.")
        self.methods = [known[m] for m in (methods or TABLE_7_7_1)]
        self.cfg = ChainConfig(passes=passes, latent_shift=latent_shift, generation_steps=generation_steps,
                               generation_guidance=generation_guidance, seed=seed, methods=known)
        self.targets = nn.ModuleDict(targets)
        self.names = signal_names(self.methods)
        self.collected = nn.ModuleDict({k: MembershipFeatures() for k in targets})
        self.results: dict | None = None

    def setup(self, stage: str) -> None:
        for t in self.targets.values():
            t.load()

    @torch.no_grad()
    def signals(self, target, x, cond, index) -> torch.Tensor:
        """(B, len(names)) signals of every configured method, in ``names`` order."""
        z = target.encode(x)
        y = target.encode_cond(cond)
        y_null = target.null_cond(x.shape[0])
        cols = [method_signals(target, m, x, z, y, y_null, index, self.cfg).flatten(1) for m in self.methods]
        return torch.cat(cols, 1)

    def test_step(self, batch, batch_idx):
        membership = batch.get("membership")
        for k, (name, target) in enumerate(self.targets.items()):
            label = batch["is_member"] if membership is None else membership[:, k]
            keep = label >= 0
            if not keep.any():
                continue
            x, idx = batch["x"][keep], batch["index"][keep]
            cond = batch["cond"][keep] if torch.is_tensor(batch["cond"]) else [c for c, m in zip(batch["cond"], keep.tolist()) if m]
            self.collected[name].update(self.signals(target, x, cond, idx), label[keep], idx)
        return None

    def on_test_epoch_end(self) -> None:
        self.results = {}
        for name, metric in self.collected.items():
            out = metric.compute()
            metric.reset()
            self.results[name] = {"names": list(self.names), **{k: v.cpu() for k, v in out.items()}}
        dm = getattr(self.trainer, "datamodule", None)
        self.eval_subsets = getattr(dm, "eval_subsets", None) if len(self.targets) == 1 else None
        if self.trainer.is_global_zero:
            folder = run_dir(self.trainer)
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"results": self.results, "methods": [m.name for m in self.methods], "config": dict(self.hparams)},
                       folder / "laionmi_signals.pt")
