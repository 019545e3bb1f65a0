"""Chapter-5 readings and the Monte-Carlo row: eq. 5.4 in pixel units (``aux_units``), the
experts' pixel-L1 d_I, and two independent simulator runs compared by the channel W1."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from rsgm.cli import main
from rsgm.components.gan import PeakRegressor, ZDCDiscriminator, ZDCGenerator
from rsgm.lightning_modules.expertsim import ExpertSim
from rsgm.lightning_modules.sdi_gan import ConditionalGAN
from rsgm.metrics.monte_carlo import monte_carlo_w1
from rsgm.physics.channels import channel_masks, channel_values
from rsgm.physics.simulator import resimulate_zdc, simulate_zdc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_aux_units_pixels_scales_eq_5_4_to_pixels():
    gen = ZDCGenerator(detector="neutron", width=0.125)
    unit = ConditionalGAN(gen, ZDCDiscriminator(), PeakRegressor(), lambda_aux=1e-3)
    pixels = ConditionalGAN(gen, ZDCDiscriminator(), PeakRegressor(), lambda_aux=1e-3, aux_units="pixels")
    image = torch.zeros(2, 1, 44, 44)
    pred, target = torch.tensor([[0.5, 0.5], [0.1, 0.2]]), torch.tensor([[0.5, 0.0], [0.2, 0.2]])
    u = float(unit.peak_loss(pred, target, image))
    assert u == pytest.approx((0.25 + 0.01) / 2)
    assert float(pixels.peak_loss(pred, target, image)) == pytest.approx(u * 43**2, rel=1e-6)
    # ExpertSim hands the unit to every expert
    model = ExpertSim(gen, ZDCDiscriminator(), PeakRegressor(), n_experts=2, aux_units="pixels")
    assert all(e.hparams.aux_units == "pixels" for e in model.experts)


def test_resimulation_is_independent_and_reproducible():
    images, cond = simulate_zdc(300, seed=3)
    a, b = resimulate_zdc(cond, seed=7), resimulate_zdc(cond.to_numpy(), seed=7)
    assert np.array_equal(a, b) and a.shape == images.shape
    assert not np.array_equal(a, resimulate_zdc(cond, seed=8))
    # same particles, same physics: photon sums agree on average, not image by image
    assert a.sum((1, 2)).mean() == pytest.approx(images.sum((1, 2)).mean(), rel=0.1)
    assert not np.array_equal(a, images)


def test_monte_carlo_w1_matches_scipy_and_is_zero_against_itself():
    images, cond = simulate_zdc(400, seed=1)
    out = monte_carlo_w1(images, cond.to_numpy(), seed=5)
    second = torch.from_numpy(resimulate_zdc(cond, seed=5))
    masks = channel_masks(44, 44)
    real, fake = channel_values(torch.from_numpy(images), masks), channel_values(second, masks)
    expected = [wasserstein_distance(real[:, c].numpy(), fake[:, c].numpy()) for c in range(5)]
    assert out["w1"] == pytest.approx(expected, rel=1e-6)
    assert out["w1_mean"] == pytest.approx(np.mean(expected), rel=1e-6)
    assert monte_carlo_w1(resimulate_zdc(cond, seed=5), cond.to_numpy(), seed=5)["w1_mean"] == 0.0
    # a second run of the same particles is far closer than a run of other particles
    other = monte_carlo_w1(simulate_zdc(400, seed=2)[0], cond.to_numpy(), seed=5)["w1_mean"]
    assert out["w1_mean"] < other


def test_reproduce_ch5_monte_carlo_row(capsys):
    import reproduce_ch5

    reproduce_ch5.main(["--mc-only", "--mc-seeds", "0", "1", "--n-synthetic", "500"])
    out = capsys.readouterr().out
    assert "| Monte-Carlo (two simulator runs) | 0.34 ± 0.014 |" in out and "±" in out.split("Monte-Carlo")[1]


CONFIGS = ROOT / "configs"
NEW_CONFIGS = {
    "synthetic2d_divco": (["sdigan_synthetic2d.yaml", "synthetic2d/divco.yaml"], ["--data.n_per_condition", "20"]),
    "zdc_divco": (["sdigan_zdc.yaml", "baselines/divco.yaml"], []),
    "zdc_msgan": (["sdigan_zdc.yaml", "baselines/msgan.yaml"], []),
    "expertsim_pixel_distance": (["expertsim.yaml", "ablations/pixel_distance.yaml"], []),
    "expertsim_aux_pixels": (["expertsim.yaml", "ablations/aux_pixels.yaml"], []),
}
ZDC_SMALL = ["--data.n_synthetic", "300", "--data.batch_size", "32", "--data.eval_batch_size", "60",
             "--model.generator.init_args.width", "0.125"]


@pytest.mark.parametrize("name", [n if n in {"synthetic2d_divco", "zdc_divco"} else pytest.param(n, marks=pytest.mark.slow)
                                  for n in NEW_CONFIGS])
def test_fast_dev_run_of_new_configs(name, tmp_path):
    files, extra = NEW_CONFIGS[name]
    main(["fit", *[a for f in files for a in ("--config", str(CONFIGS / f))], "--trainer.fast_dev_run", "true",
          "--logger", "none", "--run_dir", str(tmp_path), *(extra or ZDC_SMALL)])
