import numpy as np
import pytest
import torch

from rsgm.datamodules.zdc import ZDCDataModule, model_space_to_counts, write_zdc_pickles
from rsgm.physics.features import condition_groups, peak_pixel, per_condition_diversity, photon_sum
from rsgm.physics.simulator import CONDITION_COLUMNS, simulate_zdc


def test_simulator_shapes_and_determinism():
    for detector, shape in [("neutron", (44, 44)), ("proton", (56, 30))]:
        images, cond = simulate_zdc(300, detector, seed=3)
        assert images.shape == (300, *shape) and list(cond.columns) == list(CONDITION_COLUMNS)
        assert (images >= 0).all() and np.array_equal(images, np.round(images))
        again, _ = simulate_zdc(300, detector, seed=3)
        assert np.array_equal(images, again)


def test_simulator_physics():
    images, cond = simulate_zdc(6000, "neutron", seed=0)
    total = photon_sum(images)
    energy = cond["Energy"].to_numpy()
    # yield grows with energy
    assert np.corrcoef(np.log(energy), np.log1p(total))[0, 1] > 0.7
    # regimes: low-energy showers are dispersed, high-energy ones focused (photon-weighted RMS radius)
    rows, cols = np.meshgrid(np.arange(44), np.arange(44), indexing="ij")
    lit = total >= 20
    w = images[lit] / total[lit, None, None]
    mean_r, mean_c = (w * rows).sum((1, 2)), (w * cols).sum((1, 2))
    radius = np.sqrt((w * ((rows - mean_r[:, None, None]) ** 2 + (cols - mean_c[:, None, None]) ** 2)).sum((1, 2)))
    e = energy[lit]
    assert np.median(radius[e < 150]) > 2 * np.median(radius[(e >= 150) & (e < 800)]) > 2 * np.median(radius[e >= 800])
    # repeated conditions; charged particles respond more diversely than neutral ones
    groups = condition_groups(cond.to_numpy())
    assert len(np.unique(groups)) < 0.5 * len(groups)
    fdiv = per_condition_diversity(images, groups)
    charged = cond["charge"].to_numpy() != 0
    repeated = np.bincount(groups)[groups] > 1
    high = energy > 800
    assert fdiv[charged & repeated & high].mean() > 1.5 * fdiv[~charged & repeated & high].mean()


def test_per_condition_diversity_by_hand():
    values = np.array([[0.0, 2.0], [2.0, 2.0], [5.0, 5.0], [1.0, 1.0], [1.0, 7.0], [1.0, 1.0]])
    groups = np.array([0, 0, 1, 2, 2, 2])
    raw = np.array([np.std(values[groups == g], axis=0).sum() if (groups == g).sum() > 1 else 0.0 for g in range(3)])
    expected = (raw - raw.min()) / (raw.max() - raw.min())
    assert np.allclose(per_condition_diversity(values, groups), expected[groups])
    # statistics from training rows only; rows of groups without a fitted row get 0
    fit = np.array([True, True, False, True, True, False])
    out = per_condition_diversity(values, groups, fit_rows=fit)
    # fitted: group 0 (std sum 1) and group 2 (rows 3, 4: std sum 3); group 1 unseen
    assert out.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_peak_and_sum():
    images = np.zeros((2, 3, 4), dtype=np.float32)
    images[0, 2, 1] = 5
    images[1, 0, 3] = 2
    images[1, 1, 0] = 1
    assert peak_pixel(images).tolist() == [[2, 1], [0, 3]]
    assert photon_sum(images).tolist() == [5.0, 3.0]


@pytest.fixture
def neutron_folder(tmp_path):
    images, cond = simulate_zdc(500, "neutron", seed=1)
    write_zdc_pickles(tmp_path, images, cond, "neutron")
    return tmp_path, images, cond


def test_datamodule_reads_published_format(neutron_folder):
    folder, images, cond = neutron_folder
    dm = ZDCDataModule(path=str(folder), detector="neutron", seed=5, batch_size=32)
    dm.setup("fit")
    assert len(dm.train_set) == 400 and len(dm.test_set) == 100
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (32, 1, 44, 44) and batch["cond"].shape == (32, 9)
    i = int(batch["index"][0])
    assert torch.allclose(model_space_to_counts(batch["x"][0, 0]), torch.from_numpy(images[i]), atol=1e-3)
    assert float(batch["intensity"][0]) == pytest.approx(images[i].sum())
    train_cond = torch.stack([dm.train_set[k]["cond"] for k in range(len(dm.train_set))])
    assert torch.allclose(train_cond.mean(0)[:7], torch.zeros(7), atol=1e-4)  # standardised on the train split
    # deterministic split, cached features reused
    assert (folder / ".rsgm_cache").is_dir()
    dm2 = ZDCDataModule(path=str(folder), detector="neutron", seed=5)
    dm2.setup("fit")
    assert torch.equal(dm.test_set.tensors["index"], dm2.test_set.tensors["index"])
    assert torch.equal(dm.train_set.tensors["fdiv"], dm2.train_set.tensors["fdiv"])
    dm3 = ZDCDataModule(path=str(folder), detector="neutron", seed=6)
    dm3.setup("fit")
    assert not torch.equal(dm.test_set.tensors["index"], dm3.test_set.tensors["index"])


def test_proton_geometry(tmp_path):
    images, cond = simulate_zdc(50, "proton", seed=1)
    write_zdc_pickles(tmp_path, images, cond, "proton")
    dm = ZDCDataModule(path=str(tmp_path), detector="proton", batch_size=8)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["x"].shape == (8, 1, 56, 30)


def _setup(folder, **kw):
    ZDCDataModule(path=str(folder), detector="neutron", cache=False, **kw).setup("fit")


def _rewrite(folder, images, cond):
    for p in folder.glob("*.pkl"):
        p.unlink()
    write_zdc_pickles(folder, images, cond, "neutron")


def assert_one_line(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message
    for w in words:
        assert w in message


def test_bad_inputs_give_one_line_errors(tmp_path, neutron_folder):
    folder, images, cond = neutron_folder
    with pytest.raises(FileNotFoundError) as e:
        _setup(tmp_path / "nowhere")
    assert_one_line(e, "does not exist", "data_neutron_photonsum")

    with pytest.raises(FileNotFoundError) as e:
        ZDCDataModule(path=str(folder), detector="proton").setup("fit")
    assert_one_line(e, "data_proton_photonsum_*.pkl", "found none")

    _rewrite(folder, images[:, :40, :40], cond)
    with pytest.raises(ValueError) as e:
        _setup(folder)
    assert_one_line(e, "shape", "(N, 44, 44)")

    bad = images.copy()
    bad[3, 4, 5] = np.nan
    _rewrite(folder, bad, cond)
    with pytest.raises(ValueError) as e:
        _setup(folder)
    assert_one_line(e, "1 NaN")

    bad = images.copy()
    bad[0, 0, 0] = -2
    _rewrite(folder, bad, cond)
    with pytest.raises(ValueError) as e:
        _setup(folder)
    assert_one_line(e, "negative photon counts")

    _rewrite(folder, images, cond.drop(columns=["Vy", "charge"]))
    with pytest.raises(ValueError) as e:
        _setup(folder)
    assert_one_line(e, "lack the columns", "'Vy'", "'charge'")

    _rewrite(folder, images, cond.iloc[:-3])
    with pytest.raises(ValueError) as e:
        _setup(folder)
    assert_one_line(e, "500 images but 497 condition rows")

    nan_cond = cond.copy()
    nan_cond.loc[2, "Energy"] = np.nan
    _rewrite(folder, images, nan_cond)
    with pytest.raises(ValueError) as e:
        _setup(folder)
    assert_one_line(e, "NaN in columns ['Energy']")

    with pytest.raises(ValueError, match="unknown detector"):
        ZDCDataModule(detector="muon")


def test_synthetic_default_is_announced(caplog):
    import logging

    caplog.set_level(logging.INFO)
    dm = ZDCDataModule(path=None, n_synthetic=200)
    dm.setup("fit")
    assert "built-in synthetic simulator" in caplog.text
    assert len(dm.train_set) == 160
