"""ExpertSim: a router plus N expert conditional GANs simulating the ALICE ZDC (thesis ch. 5).

Every expert is a full :class:`~rsgm.lightning_modules.sdi_gan.ConditionalGAN` (generator,
discriminator and auxiliary peak regressor) with the SDI-GAN + intensity + auxiliary
objective, eq. 5.5, computed by the very code the single-model baselines use. The experts
are built from one generator / discriminator / regressor given in the config: each is an
independent deep copy with freshly re-initialised weights, so no tensor is shared.

Training step (manual optimisation):

1. the router assigns every sample of the batch to one expert with a straight-through
   Gumbel-softmax (``rsgm.components.router``; temperature annealed ``tau_start -> tau_end``);
2. each expert's discriminator (and regressor) is updated on the real samples routed to it
   and on its own generated responses for them;
3. each expert's generator loss, eq. 5.5, is computed on its routed sub-batch;
4. the generators and the router take one step on eq. 5.8:
   ``sum_i L(G_i, D_i) + lambda_util * L_util + lambda_diff * L_diff``.

How eq. 5.8 reaches the router (the thesis leaves it open, spec §2.4; the choices and
their measurements are in docs/expertsim.md): L_util is minus the entropy of the batch-mean
gate probabilities (entropy maximisation, the sign the text intends); L_diff uses the
experts' detached mean generated intensities weighted by the straight-through gates and
the experts' shares, on photon sums rescaled to a batch-mean real sum of
``diff_intensity_scale``; the expert losses train the experts only unless
``expert_loss_routing`` is ``raw`` / ``baselined`` (``rsgm.losses.routing.router_terms``).

An expert that receives fewer than two samples in a batch sits that step out (BatchNorm
needs two); every optimiser still steps on every rank, so DDP's all-reduce stays in step.

Inference draws each condition's expert as in training (``inference_routing="sample"``,
seeded Gumbel-max) or takes the argmax; ``rsgm.components.router.dispatch`` gives every
expert its routed sub-batch in one (optionally compiled) call.
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch import LightningModule
from torch import nn

from rsgm.components.router import Router, annealed_temperature, dispatch
from rsgm.lightning_modules.experts import build_experts
from rsgm.lightning_modules.sdi_gan import AuxUnits, Diversity, RNGStateInCheckpoint, SimulatorEvaluation, check_output_shape
from rsgm.losses.routing import router_terms
from rsgm.physics.units import model_space_to_counts
from rsgm.utils.distributed import SynchronisedManualOptimization, index_seeded_normal


class ExpertSim(RNGStateInCheckpoint, SimulatorEvaluation, SynchronisedManualOptimization, LightningModule):
    """Mixture of generative experts with a trained router.

    Args:
        generator, discriminator, aux_regressor: the template of one expert; every expert
            is an independent re-initialised copy.
        n_experts: number of experts N (thesis default 3).
        lambda_util, lambda_diff: router loss weights (thesis defaults 0.01, 1e-4).
        diff_intensity_scale: L_diff's photon sums are rescaled so that the batch's mean
            real photon sum equals this value; ``None`` uses raw photon counts.
        diff_share_weighted: weight L_diff's pairs by the experts' shares of the batch.
        expert_loss_routing: how the expert losses reach the router: ``none`` (default),
            ``raw`` or ``baselined`` (see ``rsgm.losses.routing.expert_loss_signal``).
        inference_routing: ``sample`` (the training-time routing distribution) or ``argmax``.
        router_hidden: hidden widths of the router MLP.
        tau_start, tau_end: Gumbel-softmax temperature at the start and end of training.
        diversity, image_distance, lambda_div, lambda_in, lambda_aux, aux_units: each
            expert's eq. 5.5 (see :class:`~rsgm.lightning_modules.sdi_gan.ConditionalGAN`;
            why features and unit coordinates by default: docs/expertsim.md).
        lr_g, lr_d, lr_aux, lr_router: Adam learning rates (betas 0.5, 0.999).
        data_space: ``log1p`` for ZDC images.
        eval_seed: seed of the evaluation noise.
        compile_generator: generate under ``torch.compile`` (eager fallback, logged once).
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        aux_regressor: nn.Module | None = None,
        n_experts: int = 3,
        lambda_util: float = 0.01,
        lambda_diff: float = 1e-4,
        diff_intensity_scale: float | None = 10.0,
        diff_share_weighted: bool = True,
        expert_loss_routing: Literal["baselined", "raw", "none"] = "none",
        inference_routing: Literal["sample", "argmax"] = "sample",
        router_hidden: list[int] = (128, 64, 32),
        tau_start: float = 1.2,
        tau_end: float = 0.8,
        diversity: Diversity = "selective",
        image_distance: Literal["features", "pixel"] = "features",
        lambda_div: float = 0.1,
        lambda_in: float = 1e-3,
        lambda_aux: float = 1e-3,
        aux_units: AuxUnits = "unit",
        lr_g: float = 1e-4,
        lr_d: float = 1e-5,
        lr_aux: float = 1e-4,
        lr_router: float = 1e-4,
        data_space: Literal["log1p", "linear"] = "log1p",
        eval_seed: int = 1234,
        compile_generator: bool = False,
    ) -> None:
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts must be at least 1, got {n_experts}")
        if expert_loss_routing not in ("baselined", "raw", "none"):
            raise ValueError(f"expert_loss_routing must be baselined, raw or none, got {expert_loss_routing!r}")
        if inference_routing not in ("sample", "argmax"):
            raise ValueError(f"inference_routing must be sample or argmax, got {inference_routing!r}")
        if tau_start <= 0 or tau_end <= 0:
            raise ValueError(f"Gumbel-softmax temperatures must be positive, got {tau_start} and {tau_end}")
        if lambda_aux > 0 and aux_regressor is None:
            raise ValueError("lambda_aux > 0 needs an aux_regressor (model.aux_regressor: rsgm.components.gan.PeakRegressor)")
        self.save_hyperparameters(ignore=["generator", "discriminator", "aux_regressor"])
        self.automatic_optimization = False
        self.experts = build_experts(n_experts, generator, discriminator, aux_regressor, diversity=diversity,
                                     image_distance=image_distance, lambda_div=lambda_div, lambda_in=lambda_in,
                                     lambda_aux=lambda_aux, aux_units=aux_units, data_space=data_space,
                                     compile_generator=compile_generator)
        self.router = Router(n_experts, cond_dim=generator.cond_dim, hidden=tuple(router_hidden))
        self.noise_dim = generator.noise_dim

    # -- setup ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        check_output_shape(self.experts[0].generator, getattr(self.trainer, "datamodule", None))

    def expert_parameters(self, part: str) -> list[nn.Parameter]:
        """The parameters of one part (``generator``, ``discriminator``, ``aux_regressor``) of every expert."""
        return [p for e in self.experts for p in getattr(e, part).parameters()]

    def configure_optimizers(self):
        hp, betas = self.hparams, (0.5, 0.999)
        opts = [torch.optim.Adam(self.expert_parameters("generator"), lr=hp.lr_g, betas=betas),
                torch.optim.Adam(self.expert_parameters("discriminator"), lr=hp.lr_d, betas=betas),
                torch.optim.Adam(self.router.parameters(), lr=hp.lr_router, betas=betas)]
        if self.experts[0].aux_regressor is not None:
            opts.append(torch.optim.Adam(self.expert_parameters("aux_regressor"), lr=hp.lr_aux, betas=betas))
        return opts

    def to_output_space(self, x: torch.Tensor) -> torch.Tensor:
        return model_space_to_counts(x) if self.hparams.data_space == "log1p" else x

    def temperature(self, batch_idx: int) -> float:
        """The Gumbel-softmax temperature at this point of training (linear in epochs)."""
        trainer = self._trainer
        if trainer is None or trainer.max_epochs is None or trainer.max_epochs < 1:
            return self.hparams.tau_end
        n_batches = trainer.num_training_batches
        within = batch_idx / n_batches if 0 < n_batches < float("inf") else 0.0
        progress = (trainer.current_epoch + within) / trainer.max_epochs
        return annealed_temperature(progress, self.hparams.tau_start, self.hparams.tau_end)

    # -- training ------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        hp = self.hparams
        opt_g, opt_d, opt_router, *opt_aux = self.optimizers()
        x, c = batch["x"], batch["cond"]
        tau = self.temperature(batch_idx)
        gates, probs = self.router.route(c, tau)
        expert_of = gates.detach().argmax(dim=1)
        routed = [torch.nonzero(expert_of == i).squeeze(1) for i in range(hp.n_experts)]
        active = [i for i, idx in enumerate(routed) if len(idx) >= 2]
        z1, z2 = torch.randn(len(x), self.noise_dim, device=self.device), torch.randn(len(x), self.noise_dim, device=self.device)

        def sub(idx: torch.Tensor) -> dict[str, torch.Tensor]:
            return {k: v[idx] for k, v in batch.items()}

        # Discriminators (and regressors): each on its own routed real and generated samples.
        loss_d = x.new_zeros(())
        loss_aux = x.new_zeros(())
        for i in active:
            expert, idx = self.experts[i], routed[i]
            with torch.no_grad():
                fake = expert.generator(z1[idx], c[idx])
            loss_d_i, loss_aux_i = expert.critic_losses(x[idx], c[idx], fake, batch["peak"][idx] if opt_aux else None)
            loss_d = loss_d + loss_d_i
            loss_aux = loss_aux + loss_aux_i if opt_aux else loss_aux
        # Unconditional steps: a rank without active experts must still join the gradient all-reduce.
        for opt, loss_part in [(opt_d, loss_d)] + [(o, loss_aux) for o in opt_aux]:
            opt.zero_grad()
            if loss_part.requires_grad:
                self.manual_backward(loss_part)
            opt.step()

        # Generators and router: eq. 5.5 per expert on its routed samples, plus eq. 5.8's terms.
        # The critics are fixed during this step; their gradients would be wasted work.
        critics = self.expert_parameters("discriminator") + (self.expert_parameters("aux_regressor") if opt_aux else [])
        for p in critics:
            p.requires_grad_(False)
        loss_experts = x.new_zeros(())
        expert_losses: dict[int, torch.Tensor] = {}  # detached, for the router
        intensity = x.new_zeros(len(x))
        terms_sum: dict[str, torch.Tensor] = {}
        for i in active:
            expert, idx = self.experts[i], routed[i]
            loss_i, terms, fake = expert.generator_loss(sub(idx), z1[idx], z2[idx], expert.generator,
                                                        expert.discriminator, expert.aux_regressor)
            loss_experts = loss_experts + loss_i
            expert_losses[i] = loss_i.detach()
            intensity = intensity.index_put((idx,), self.to_output_space(fake.detach()).flatten(1).sum(1))
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + v.detach()
        router_signal, loss_util, loss_diff = router_terms(
            gates, probs, routed, active, expert_losses, intensity, batch["intensity"],
            expert_loss_routing=hp.expert_loss_routing, diff_intensity_scale=hp.diff_intensity_scale,
            diff_share_weighted=hp.diff_share_weighted)
        loss = loss_experts + router_signal + hp.lambda_util * loss_util + hp.lambda_diff * loss_diff
        opt_g.zero_grad()
        opt_router.zero_grad()
        self.manual_backward(loss)
        opt_g.step()
        opt_router.step()
        for p in critics:
            p.requires_grad_(True)

        share = torch.bincount(expert_of, minlength=hp.n_experts).float() / len(x)
        logs = {"train/loss_d": loss_d, "train/loss_g": loss_experts, "train/loss_router": loss,
                "train/l_util": loss_util, "train/l_diff": loss_diff, "train/tau": tau}
        if opt_aux:
            logs["train/loss_aux_regressor"] = loss_aux
        logs.update({f"train/g_{k}": v for k, v in terms_sum.items()})
        logs.update({f"train/share_expert{i}": share[i] for i in range(hp.n_experts)})
        self.log_dict(logs, batch_size=len(x), sync_dist=True)
        self.log_dict({"loss_d": loss_d, "loss_g": loss_experts}, prog_bar=True, logger=False, batch_size=len(x))

    # -- generation ----------------------------------------------------------------------
    @torch.inference_mode()
    def route(self, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The expert id of every condition at inference (see ``inference_routing``)."""
        return self.router.assign(cond, sample=self.hparams.inference_routing == "sample", generator=generator)

    @torch.inference_mode()
    def dispatch(self, z: torch.Tensor, cond: torch.Tensor, expert_of: torch.Tensor) -> torch.Tensor:
        """Model-space responses for ``(z, cond)`` routed to experts ``expert_of`` (one call per expert)."""
        return dispatch([e.run_generator for e in self.experts], z, cond, expert_of)

    @torch.inference_mode()
    def simulate(self, cond: torch.Tensor, generator: torch.Generator | None = None,
                 index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Photon counts and expert ids for ``cond``; noise and routing from ``generator``, or by ``index`` alone."""
        hp, seeded = self.hparams, index is not None
        z = (index_seeded_normal(index, self.noise_dim, hp.eval_seed) if seeded
             else torch.randn(len(cond), self.noise_dim, generator=generator))
        u = torch.special.ndtr(index_seeded_normal(index, hp.n_experts, hp.eval_seed + 1)) if seeded else None
        expert_of = self.router.assign(cond, sample=hp.inference_routing == "sample", generator=generator, uniforms=u)
        return self.to_output_space(self.dispatch(z.to(cond.device), cond, expert_of)), expert_of

    def generate(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Evaluation outputs; noise and routing seeded by each sample's index."""
        fake, expert_of = self.simulate(batch["cond"], index=batch["index"])
        return {"real": self.to_output_space(batch["x"]), "fake": fake,
                "expert": expert_of, "index": batch["index"], "batch": batch}

