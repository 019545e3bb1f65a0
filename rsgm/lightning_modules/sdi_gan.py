"""The conditional-GAN family of thesis chapters 4-5: DC-GAN, MS-GAN, DivCo and SDI-GAN.

``diversity`` picks the regulariser: ``none`` (conditional DC-GAN), ``uniform`` (MS-GAN,
weight 1 for every condition), ``selective`` (SDI-GAN, weight f_div(c)) or ``divco``
(DivCo's latent-augmented contrastive loss on the discriminator's features,
``rsgm.losses.gan.divco_loss``: one positive code within ``divco_radius`` of z per
coordinate, ``divco_negatives`` independent codes, temperature ``divco_tau``).
``image_distance`` picks d_I: ``features`` (L1 between the discriminator's penultimate
features, chapter 4) or ``pixel`` (L1 between the outputs, chapter 5). Optional chapter-5
terms: intensity regularisation (``lambda_in``) and the auxiliary peak regressor
(``lambda_aux``, needs ``aux_regressor``; ``aux_units`` is the unit of eq. 5.4: ``unit``,
coordinates scaled to [0, 1] as the data serve them, or ``pixels``, eq. 5.4 as printed).

Batches are dicts with ``x``, ``cond``, ``fdiv`` and ``index`` (plus ``intensity`` and
``peak`` for the chapter-5 terms). ``data_space="log1p"`` says ``x`` is ``log(1 + counts)``;
evaluation outputs are then mapped back to photon counts. ``compile_generator`` runs the
generator under ``torch.compile`` for generation (evaluation and ``rsgm predict``; eager
when compilation is unavailable); training is always eager.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from rsgm.components.gan import CompiledForInference
from rsgm.errors import BadValueError
from rsgm.losses.gan import auxiliary_loss, discriminator_loss, diversity_loss, divco_loss, generator_adversarial_loss, intensity_loss
from rsgm.physics.units import model_space_to_counts
from rsgm.utils.distributed import SynchronisedManualOptimization, index_seeded_normal

Diversity = Literal["none", "uniform", "selective", "divco"]
AuxUnits = Literal["unit", "pixels"]


def check_output_shape(generator: nn.Module, datamodule: Any) -> None:
    """A one-line error when the generator's image shape does not match the data's."""
    produced = getattr(generator, "image_shape", None)
    expected = getattr(datamodule, "image_shape", None)
    if produced is not None and expected is not None and tuple(produced) != tuple(expected):
        raise BadValueError(f"the generator produces {tuple(produced)} images but the data are {tuple(expected)}; "
                            "set the detector once, with --data.detector (the model parts follow it)")


class RNGStateInCheckpoint:
    """Mixin: save and restore torch's global RNG state, so a run resumed from a checkpoint
    draws the same noise and shuffles as the uninterrupted run (all training randomness
    comes from torch; a tensor keeps the checkpoint loadable with ``weights_only``)."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])


class SimulatorEvaluation:
    """Mixin: validation and test steps return ``self.generate(batch)`` (real and generated
    responses for the evaluation callbacks); predict returns the generated responses in
    photon counts with the batch's bookkeeping (``index``, ``sample``, ``position``,
    ``raw_cond``) and, for a mixture, the ``expert`` of each (see
    ``rsgm.callbacks.prediction_writer``). The model provides ``simulate(cond, generator,
    index=None)`` returning ``(responses, expert ids or None)``; with ``index``, the noise of
    each row is seeded by its index alone (any batch size or process count gives the same)."""

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self.generate(batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self.generate(batch)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        # Noise seeded by each output row's position: the same for any batch size and process count.
        fake, expert = self.simulate(batch["cond"], index=batch["position"] if "position" in batch else batch["index"])
        out = {"fake": fake, **{k: batch[k] for k in ("index", "sample", "position", "raw_cond") if k in batch}}
        if expert is not None:
            out["expert"] = expert
        return out


class ConditionalGAN(RNGStateInCheckpoint, SimulatorEvaluation, SynchronisedManualOptimization, LightningModule):
    """Conditional GAN with DC-GAN / MS-GAN / SDI-GAN regularisation (manual optimisation;
    data-parallel under any DDP strategy through ``rsgm.utils.distributed``).

    Args:
        generator: ``G(z, c)``; must expose ``noise_dim``.
        discriminator: ``D(x, c) -> (logit, features)``.
        aux_regressor: ``A(x) -> peak (row, col)``; trained on real data, used on generated.
        diversity / image_distance: see the module docstring.
        lambda_div, lambda_in, lambda_aux: weights of eq. 5.5.
        aux_units: ``unit`` or ``pixels`` (see the module docstring).
        divco_negatives, divco_radius, divco_tau: DivCo's contrastive loss (``diversity: divco``).
        lr_g, lr_d, lr_aux: Adam learning rates (betas 0.5, 0.999).
        data_space: ``log1p`` for ZDC images, ``linear`` for vector data.
        eval_seed: seed of the evaluation noise, so epochs are compared on the same draws.
        compile_generator: generate under ``torch.compile`` (eager fallback, logged once).
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        aux_regressor: nn.Module | None = None,
        diversity: Diversity = "selective",
        image_distance: Literal["features", "pixel"] = "features",
        lambda_div: float = 0.1,
        lambda_in: float = 0.0,
        lambda_aux: float = 0.0,
        aux_units: AuxUnits = "unit",
        divco_negatives: int = 4,
        divco_radius: float = 0.01,
        divco_tau: float = 1.0,
        lr_g: float = 1e-4,
        lr_d: float = 1e-5,
        lr_aux: float = 1e-4,
        data_space: Literal["log1p", "linear"] = "log1p",
        eval_seed: int = 1234,
        compile_generator: bool = False,
    ) -> None:
        super().__init__()
        if diversity not in ("none", "uniform", "selective", "divco"):
            raise ValueError(f"diversity must be none, uniform, selective or divco, got {diversity!r}")
        if aux_units not in ("unit", "pixels"):
            raise ValueError(f"aux_units must be unit or pixels, got {aux_units!r}")
        if divco_negatives < 1 or divco_tau <= 0:
            raise ValueError(f"DivCo needs divco_negatives >= 1 and divco_tau > 0, got {divco_negatives} and {divco_tau}")
        if lambda_aux > 0 and aux_regressor is None:
            raise ValueError("lambda_aux > 0 needs an aux_regressor")
        self.save_hyperparameters(ignore=["generator", "discriminator", "aux_regressor"])
        self.automatic_optimization = False
        self.generator, self.discriminator, self.aux_regressor = generator, discriminator, aux_regressor
        self._compiled: CompiledForInference | None = None

    def setup(self, stage: str) -> None:
        check_output_shape(self.generator, getattr(self.trainer, "datamodule", None))

    def configure_optimizers(self):
        hp = self.hparams
        opts = [torch.optim.Adam(self.generator.parameters(), lr=hp.lr_g, betas=(0.5, 0.999)),
                torch.optim.Adam(self.discriminator.parameters(), lr=hp.lr_d, betas=(0.5, 0.999))]
        if self.aux_regressor is not None:
            opts.append(torch.optim.Adam(self.aux_regressor.parameters(), lr=hp.lr_aux, betas=(0.5, 0.999)))
        return opts

    def to_output_space(self, x: torch.Tensor) -> torch.Tensor:
        return model_space_to_counts(x) if self.hparams.data_space == "log1p" else x

    def noise(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.generator.noise_dim, device=self.device)

    def generator_loss(self, batch: dict[str, torch.Tensor], z1: torch.Tensor, z2: torch.Tensor,
                       generator: nn.Module, discriminator: nn.Module, aux_regressor: nn.Module | None,
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Eq. 5.5 for one generator; returns (loss, its terms, the first generated batch)."""
        hp, c = self.hparams, batch["cond"]
        x1 = generator(z1, c)
        logit1, f1 = discriminator(x1, c)
        terms = {"adv": generator_adversarial_loss(logit1)}
        if hp.diversity == "divco" and hp.lambda_div > 0:
            terms["div"] = hp.lambda_div * self.divco_term(c, z1, f1, generator, discriminator)
        elif hp.diversity != "none" and hp.lambda_div > 0:
            x2 = generator(z2, c)
            logit2, f2 = discriminator(x2, c)
            terms["adv"] = 0.5 * (terms["adv"] + generator_adversarial_loss(logit2))
            d1, d2 = (f1, f2) if hp.image_distance == "features" else (x1, x2)
            weight = batch["fdiv"] if hp.diversity == "selective" else torch.ones_like(batch["fdiv"])
            terms["div"] = hp.lambda_div * diversity_loss(weight, z1, z2, d1, d2)
        if hp.lambda_in > 0:
            terms["in"] = hp.lambda_in * intensity_loss(self.to_output_space(x1).flatten(1).sum(1), batch["intensity"])
        if hp.lambda_aux > 0:
            terms["aux"] = hp.lambda_aux * self.peak_loss(aux_regressor(x1), batch["peak"], x1)
        return sum(terms.values()), terms, x1

    def divco_term(self, c: torch.Tensor, z: torch.Tensor, features: torch.Tensor, generator: nn.Module,
                   discriminator: nn.Module) -> torch.Tensor:
        """DivCo's loss for anchors G(c, z) with discriminator ``features``: one positive
        code z + U(-r, r) per sample and K independent negatives, generated in one call."""
        hp, k = self.hparams, self.hparams.divco_negatives
        z_pos = z + hp.divco_radius * (2 * torch.rand_like(z) - 1)
        codes = torch.cat([z_pos.unsqueeze(0), torch.randn(k, *z.shape, device=z.device, dtype=z.dtype)]).flatten(0, 1)
        cond = c.repeat(k + 1, *[1] * (c.dim() - 1))
        _, f = discriminator(generator(codes, cond), cond)
        f = f.reshape(k + 1, len(z), -1)
        return divco_loss(features.flatten(1), f[0], f[1:].transpose(0, 1), hp.divco_tau)

    def peak_loss(self, predicted: torch.Tensor, target: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Eq. 5.4 on peak coordinates stored in [0, 1], in the unit ``aux_units`` names."""
        pixels = self.hparams.get("aux_units", "unit") == "pixels"
        rows, cols = image.shape[-2:]
        return auxiliary_loss(predicted, target, torch.tensor([rows - 1.0, cols - 1.0]) if pixels else None)

    def critic_losses(self, x: torch.Tensor, c: torch.Tensor, fake: torch.Tensor,
                      peak: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The discriminator's loss on real ``x`` against ``fake``, and the regressor's
        eq. 5.4 on real ``x`` (``None`` without a regressor)."""
        real_logit, _ = self.discriminator(x, c)
        fake_logit, _ = self.discriminator(fake, c)
        loss_aux = None if self.aux_regressor is None else self.peak_loss(self.aux_regressor(x), peak, x)
        return discriminator_loss(real_logit, fake_logit), loss_aux

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        opt_g, opt_d, *opt_aux = self.optimizers()
        x, c = batch["x"], batch["cond"]
        z1, z2 = self.noise(len(x)), self.noise(len(x))

        with torch.no_grad():
            fake = self.generator(z1, c)
        loss_d, loss_aux = self.critic_losses(x, c, fake, batch.get("peak"))
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        logs = {"train/loss_d": loss_d}

        if opt_aux:
            opt_aux[0].zero_grad()
            self.manual_backward(loss_aux)
            opt_aux[0].step()
            logs["train/loss_aux_regressor"] = loss_aux

        self.toggle_optimizer(opt_g)
        loss_g, terms, _ = self.generator_loss(batch, z1, z2, self.generator, self.discriminator, self.aux_regressor)
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        logs["train/loss_g"] = loss_g
        logs.update({f"train/g_{k}": v for k, v in terms.items()})
        self.log_dict(logs, prog_bar=False, batch_size=len(x), sync_dist=True)
        self.log_dict({"loss_d": loss_d, "loss_g": loss_g}, prog_bar=True, logger=False, batch_size=len(x))

    def evaluation_noise(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Noise seeded by each sample's index: the same draws every epoch, for any batch size
        and number of processes (so a 2-process ``rsgm test`` reproduces 1 process)."""
        return index_seeded_normal(batch["index"], self.generator.noise_dim, self.hparams.eval_seed).to(self.device)

    def run_generator(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The generator for generation: compiled when ``compile_generator``, in eval mode
        and without gradients; eager otherwise."""
        if not self.hparams.get("compile_generator", False) or torch.is_grad_enabled() or self.generator.training:
            return self.generator(z, cond)
        if self._compiled is None:
            self._compiled = CompiledForInference(self.generator, log=rank_zero_info)
        if len(z) == 1:  # batch size 1 would be a second compilation; rows are independent in eval mode
            return self._compiled(z.expand(2, -1), cond.expand(2, -1))[:1]
        return self._compiled(z, cond)

    @torch.inference_mode()
    def simulate(self, cond: torch.Tensor, generator: torch.Generator | None = None,
                 index: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """Output-space (photon-count) responses for ``cond``; noise drawn from ``generator``,
        or seeded by each row's ``index`` (``index_seeded_normal``) when given."""
        z = (torch.randn(len(cond), self.generator.noise_dim, generator=generator) if index is None
             else index_seeded_normal(index, self.generator.noise_dim, self.hparams.eval_seed)).to(cond.device)
        return self.to_output_space(self.run_generator(z, cond)), None

    @torch.inference_mode()
    def generate(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Evaluation outputs on per-sample noise (``evaluation_noise``): every epoch, batch
        size and number of processes compares the same draws."""
        fake = self.to_output_space(self.run_generator(self.evaluation_noise(batch), batch["cond"]))
        return {"real": self.to_output_space(batch["x"]), "fake": fake, "index": batch["index"], "batch": batch}
