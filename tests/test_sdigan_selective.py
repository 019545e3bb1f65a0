"""SDI-GAN's selective diversity term acts only on conditions whose real data are diverse."""

import pytest
import torch

from rsgm.components.gan import MLPDiscriminator, MLPGenerator
from rsgm.datamodules.synthetic2d import Synthetic2DDataModule
from rsgm.lightning_modules.sdi_gan import ConditionalGAN


def diversity_force(diversity: str) -> dict[int, float]:
    """Mean norm of the diversity term's gradient on each generated point, per spread flag:
    the push a generator receives towards more diverse outputs for each condition."""
    torch.manual_seed(0)
    dm = Synthetic2DDataModule(n_per_condition=40)
    dm.setup()
    batch = dm.train_set.tensors
    gan = ConditionalGAN(MLPGenerator(), MLPDiscriminator(), diversity=diversity, image_distance="pixel",
                         lambda_div=1.0, data_space="linear")
    outputs = []
    generator = lambda z, c: outputs.append(gan.generator(z, c).detach().requires_grad_()) or outputs[-1]  # noqa: E731
    z1, z2 = gan.noise(len(batch["x"])), gan.noise(len(batch["x"]))
    _, terms, _ = gan.generator_loss(batch, z1, z2, generator, gan.discriminator, None)
    grads = torch.autograd.grad(terms["div"], outputs)
    force = sum(g.norm(dim=1) for g in grads)
    return {s: float(force[batch["spread"] == s].mean()) for s in (0, 1)}


def test_selective_term_pushes_only_diverse_conditions():
    selective, uniform = diversity_force("selective"), diversity_force("uniform")
    # MS-GAN's uniform term pushes every condition towards diversity ...
    assert uniform[0] > 0 and uniform[1] > 0
    # ... SDI-GAN's f_div (learnt from the data: about 0 for spread 0, about 1 for spread 1)
    # pushes the diverse conditions only.
    assert selective[0] < 0.05 * uniform[0]
    assert selective[1] > 0.8 * uniform[1]


def test_dcgan_has_no_diversity_term():
    dm = Synthetic2DDataModule(n_per_condition=10)
    dm.setup()
    gan = ConditionalGAN(MLPGenerator(), MLPDiscriminator(), diversity="none", data_space="linear")
    b = dm.train_set.tensors
    _, terms, _ = gan.generator_loss(b, gan.noise(len(b["x"])), gan.noise(len(b["x"])), gan.generator, gan.discriminator, None)
    assert set(terms) == {"adv"}
    with pytest.raises(ValueError, match="diversity"):
        ConditionalGAN(MLPGenerator(), MLPDiscriminator(), diversity="sometimes")
