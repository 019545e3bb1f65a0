"""Privacy audit of an image autoregressive model (thesis ch. 9): MIAs, dataset inference,
extraction and the noise mitigation, ``rsgm test --config configs/iar_mia_digits.yaml``.

``test_step`` extracts every MIA feature of each sample of P and U through the target
adapter (:mod:`rsgm.privacy.iar_features`: two passes per sample, conditional and null),
plus the features under each mitigation noise level and what extraction needs (candidate
distance, tokens, image, class). "cat" metrics gather them across DDP ranks, de-duplicated
by sample index. At test end, rank 0 runs the extraction attack and the generation utility
(the only steps that need the network again) and leaves everything in ``self.results``;
:class:`rsgm.callbacks.iar_report.IARReport` computes the tables and figures from it.
An optional ``reference_dm`` (a diffusion adapter) adds the built-in DM's loss features for
the IAR-vs-DM comparison.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch import nn

from rsgm.components.iar_adapters import IARTarget
from rsgm.metrics.membership import MembershipFeatures
from rsgm.privacy import iar_extraction as E
from rsgm.privacy.iar_features import IARFeatureConfig, extract_features
from rsgm.metrics.fidelity import frechet_distance
from rsgm.privacy.iar_utility import dm_generation_utility, fit_digit_classifier, fit_feature_net, generation_utility, hidden_features
from rsgm.utils.figures import run_dir


def feature_fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows = samples)."""
    real, fake = real.double(), fake.double()
    return float(frechet_distance(real.mean(0), torch.cov(real.T), fake.mean(0), torch.cov(fake.T)))


class IARAttack(LightningModule):
    """Args:
        target: the audited IAR behind the adapter protocol.
        feature_options: overrides of :class:`IARFeatureConfig` (ks, mask_ratio, timestep, draws,
            seed, and the mitigation sigma grid: logit_noise for token models, token_noise for
            masked ones).
        extraction: {per_class, prefix_len, sscd_path} or null to skip (token models: greedy
            completion; masked models: 5 %-unmasked one-step candidates, sampled completion).
        utility_per_class: generated digits per class for the utility of each sigma (0: skip);
            utility = digits-classifier accuracy and feature-space FID (MLP hidden layer).
        utility_sampling: the target's sampling options for the utility samples, e.g.
            ``{temperature: 0.8, cfg: 1.0}`` (built-in token models; default temperature 1, no CFG).
        sampling_sweep: further sampling settings (list of such dicts) whose utility (no
            mitigation noise) is measured too, to compare models at comparable utility.
        reference_dm: optional diffusion target for the IAR-vs-DM table; dm_timesteps: its
            denoising-loss timesteps; dm_label: its name in the table.
        features_cache: an ``iar_features.pt`` of an earlier run: the statistics re-run without
            touching the model (extraction and generation are then skipped).
    """

    def __init__(self, target: IARTarget, feature_options: dict | None = None, extraction: dict | None = None,
                 utility_per_class: int = 50, utility_sampling: dict | None = None,
                 sampling_sweep: list[dict] | None = None, reference_dm: nn.Module | None = None,
                 dm_timesteps: list[int] | None = None, dm_label: str = "DM", label: str = "IAR",
                 features_cache: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["target", "reference_dm"])
        opts = dict(feature_options or {})
        for key in ("logit_noise", "token_noise"):
            opts[key] = tuple(opts.get(key, ()))
        self.cfg = IARFeatureConfig(**opts)
        self.target, self.reference_dm = target, reference_dm
        self.sigmas = self.cfg.noise_grid(target.kind)  # the mitigation grid: logits or continuous tokens
        self.collected = MembershipFeatures()
        self.noisy = nn.ModuleList(MembershipFeatures() for _ in self.sigmas)
        self.aux = MembershipFeatures()  # distance, class, image pixels, tokens per sample
        self.dm = MembershipFeatures()
        self.names: list[str] | None = None
        self.results: dict | None = None

    def setup(self, stage: str) -> None:
        if self.hparams.features_cache:
            return
        self.target.load()
        if self.reference_dm is not None:
            self.reference_dm.load()

    def test_step(self, batch, batch_idx):
        if self.hparams.features_cache:
            return None
        x, cond, index = batch["x"], batch["cond"], batch["index"]
        out = extract_features(self.target, x, cond, index, self.cfg)
        self.names = list(out["features"])
        stack = lambda d: torch.stack([d[n] for n in self.names], 1)
        args = (batch["is_member"], index, batch.get("in_suspect"))
        self.collected.update(stack(out["features"]), *args)
        for metric, sigma in zip(self.noisy, self.sigmas):
            metric.update(stack(out["noisy"][sigma]), *args)
        aux = torch.cat([out["distance"].view(-1, 1), cond.view(-1, 1).double(), x.flatten(1).double(), out["tokens"].flatten(1).double()], 1)
        self.aux.update(aux, *args)
        if self.reference_dm is not None:
            self.dm.update(self._dm_features(x, cond, index), *args)

    @torch.no_grad()
    def _dm_features(self, x, cond, index):
        """Minus the DM's denoising loss at each of ``dm_timesteps`` (one noise draw per sample
        and timestep, seeded by the sample index), higher = member."""
        from rsgm.privacy.iar_features import _noise_like

        dm, ts = self.reference_dm, self.hparams.dm_timesteps or [100, 200, 300, 400, 500]
        z = dm.encode(x)
        y = dm.encode_cond(cond)
        cols = []
        for j, t in enumerate(ts):
            eps = _noise_like(z.shape[1:], index, self.cfg.seed, 500 + j).to(z)
            ab = dm.alphas_cumprod[t]
            tt = torch.full((len(z),), t, dtype=torch.long, device=z.device)
            cols.append(-(dm.eps(ab.sqrt() * z + (1 - ab).sqrt() * eps, tt, y) - eps).pow(2).flatten(1).mean(1))
        return torch.stack(cols, 1).double()

    def on_test_epoch_end(self) -> None:
        if self.hparams.features_cache:
            from pathlib import Path

            from rsgm.errors import RSGMError

            if not Path(self.hparams.features_cache).is_file():
                raise RSGMError(f"features cache '{self.hparams.features_cache}' not found: pass the iar_features.pt of an earlier `rsgm test` run.")
            self.results = torch.load(self.hparams.features_cache, map_location="cpu", weights_only=True)
            return
        res = self.collected.compute()
        aux = self.aux.compute()["features"].cpu()
        n_pix = self.trainer.datamodule.dataset[0]["x"].numel()
        shape = self.trainer.datamodule.dataset[0]["x"].shape
        self.results = {"names": self.names, **{k: v.cpu() for k, v in res.items()}, "label": self.hparams.label,
                        "kind": self.target.kind, "config": vars(self.cfg),
                        "noisy": {s: m.compute()["features"].cpu() for s, m in zip(self.sigmas, self.noisy)},
                        "distance": aux[:, 0], "cond": aux[:, 1].long(), "images": aux[:, 2:2 + n_pix].float().view(-1, *shape),
                        "calls": dict(self.target.calls)}
        tokens = aux[:, 2 + n_pix:]
        self.results["tokens"] = tokens.long() if self.target.kind == "token" else tokens.float()
        if self.reference_dm is not None:
            self.results["dm"] = {"label": self.hparams.dm_label, "features": self.dm.compute()["features"].cpu(),
                                  "names": [f"dm_loss_t{t}" for t in (self.hparams.dm_timesteps or [100, 200, 300, 400, 500])]}
        for m in [self.collected, self.aux, self.dm, *self.noisy]:
            m.reset()
        if self.trainer.is_global_zero:
            self._generate_parts()
            run_dir(self.trainer).mkdir(parents=True, exist_ok=True)
            skip = ("extraction", "extraction_originals")
            torch.save({k: v for k, v in self.results.items() if k not in skip}, run_dir(self.trainer) / "iar_features.pt")

    def _generate_parts(self) -> None:
        """Extraction and generation utility: the steps that call the network again."""
        r, opts = self.results, self.hparams.extraction
        if opts is not None:
            member, val = r["is_member"].bool(), ~r["is_member"].bool()
            tokens = r["tokens"]
            if self.target.kind != "token":  # MAR: continuous tokens; candidates 5 % unmasked, 95 % predicted in one step
                tokens = self.target.tokenize(r["images"])
                r["distance"] = E.masked_candidate_distance(self.target, r["images"], r["cond"], r["index"], seed=self.cfg.seed)
            part = lambda m: {"images": r["images"][m], "tokens": tokens[m], "cond": r["cond"][m], "distance": r["distance"][m]}
            sim = E.load_sscd(opts.get("sscd_path"))
            ext = E.extract(self.target, part(member), part(val), opts.get("per_class", 5), opts.get("prefix_len", 16), sim, seed=self.cfg.seed)
            r["extraction"] = ext
            r["extraction_originals"] = r["images"][member][ext.extracted]
        if self.hparams.utility_per_class:
            n = self.hparams.utility_per_class
            clf, net = fit_digit_classifier(r["images"], r["cond"]), fit_feature_net(r["images"], r["cond"], seed=self.cfg.seed)
            real = hidden_features(net, r["images"])
            fid = lambda x: feature_fid(real, hidden_features(net, x))
            r["utility"] = {s: generation_utility(self.target, clf, n, s, seed=self.cfg.seed, sampling=self.hparams.utility_sampling) for s in (0.0, *self.sigmas)}
            for u in r["utility"].values():
                u["fid"] = fid(u["samples"])
            r["sampling_sweep"] = []
            for opts in self.hparams.sampling_sweep or []:
                u = generation_utility(self.target, clf, n, 0.0, seed=self.cfg.seed, sampling=opts)
                r["sampling_sweep"].append({**opts, "accuracy": u["accuracy"], "fid": fid(u["samples"])})
            g = torch.Generator().manual_seed(self.cfg.seed)  # floor of the FID: as many real digits as samples
            r["fid_real"] = fid(r["images"][torch.randperm(len(real), generator=g)[: 10 * n]])
            if self.reference_dm is not None:
                dm = dm_generation_utility(self.reference_dm, clf, n, seed=self.cfg.seed, shape=tuple(r["images"].shape[1:]))
                r["dm_utility"], r["dm_fid"] = dm["accuracy"], fid(dm["samples"])
