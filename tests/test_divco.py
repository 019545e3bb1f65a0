"""DivCo baseline (thesis Table 4.4.1): the cGAN's ``diversity: divco`` term is DivCo's
contrastive loss on discriminator features of one positive (z + U(-r, r)) and K negatives."""

import pytest
import torch

from rsgm.components.gan import MLPDiscriminator, MLPGenerator
from rsgm.lightning_modules.sdi_gan import ConditionalGAN
from rsgm.losses.gan import divco_loss


def gan(**kw) -> ConditionalGAN:
    torch.manual_seed(0)
    return ConditionalGAN(MLPGenerator(), MLPDiscriminator(), diversity="divco", data_space="linear", **kw)


def batch(n: int = 6) -> dict[str, torch.Tensor]:
    cond = torch.zeros(n, 10)
    cond[torch.arange(n), torch.arange(n) % 9] = 1.0
    return {"x": torch.randn(n, 2), "cond": cond, "fdiv": torch.rand(n), "index": torch.arange(n)}


def test_divco_term_is_the_contrastive_loss_of_the_drawn_codes():
    model = gan(lambda_div=0.5, divco_negatives=3, divco_radius=0.2, divco_tau=0.7)
    b = batch()
    z1, z2 = model.noise(6), model.noise(6)
    torch.manual_seed(1)
    _, terms, _ = model.generator_loss(b, z1, z2, model.generator, model.discriminator, None)
    # The same draws by hand: positive within the radius of z1, then 3 independent negatives.
    torch.manual_seed(1)
    z_pos = z1 + 0.2 * (2 * torch.rand_like(z1) - 1)
    z_neg = torch.randn(3, 6, model.generator.noise_dim)
    feats = lambda z: model.discriminator(model.generator(z, b["cond"]), b["cond"])[1]  # noqa: E731
    expected = 0.5 * divco_loss(feats(z1), feats(z_pos), torch.stack([feats(z) for z in z_neg], dim=1), 0.7)
    assert float(terms["div"]) == pytest.approx(float(expected), rel=1e-5)
    assert set(terms) == {"adv", "div"}


def test_divco_term_trains_the_generator_and_is_off_at_zero_weight():
    model = gan()
    b = batch()
    loss, terms, _ = model.generator_loss(b, model.noise(6), model.noise(6), model.generator, model.discriminator, None)
    grads = torch.autograd.grad(terms["div"], list(model.generator.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    _, terms0, _ = gan(lambda_div=0.0).generator_loss(b, model.noise(6), model.noise(6), model.generator,
                                                      model.discriminator, None)
    assert "div" not in terms0


def test_bad_divco_arguments():
    with pytest.raises(ValueError, match="divco"):
        gan(divco_negatives=0)
    with pytest.raises(ValueError, match="aux_units"):
        gan(aux_units="cm")
