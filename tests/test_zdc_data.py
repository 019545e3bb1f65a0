import numpy as np
import pytest
import torch

from rsgm.datamodules.zdc import ZDCDataModule, write_zdc_pickles
from rsgm.errors import RSGMError
from rsgm.physics.units import model_space_to_counts
from rsgm.physics.zdc_files import convert_pickles_to_hdf5
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
    with pytest.raises(RSGMError) as e:
        _setup(tmp_path / "nowhere")
    assert_one_line(e, "does not exist", "data_neutron_photonsum")

    with pytest.raises(RSGMError) as e:
        ZDCDataModule(path=str(folder), detector="proton").setup("fit")
    assert_one_line(e, "data_proton_photonsum_*.pkl", "found none")

    _rewrite(folder, images[:, :40, :40], cond)
    with pytest.raises(RSGMError) as e:
        _setup(folder)
    assert_one_line(e, "shape", "(N, 44, 44)")

    bad = images.copy()
    bad[3, 4, 5] = np.nan
    _rewrite(folder, bad, cond)
    with pytest.raises(RSGMError) as e:
        _setup(folder)
    assert_one_line(e, "1 NaN", "data_neutron_photonsum")

    bad = images.copy()
    bad[0, 0, 0] = -2
    _rewrite(folder, bad, cond)
    with pytest.raises(RSGMError) as e:
        _setup(folder)
    assert_one_line(e, "negative photon counts")

    _rewrite(folder, images, cond.drop(columns=["Vy", "charge"]))
    with pytest.raises(RSGMError) as e:
        _setup(folder)
    assert_one_line(e, "lack the columns", "'Vy'", "'charge'")

    _rewrite(folder, images, cond.iloc[:-3])
    with pytest.raises(RSGMError) as e:
        _setup(folder)
    assert_one_line(e, "500 images but 497 condition rows")

    nan_cond = cond.copy()
    nan_cond.loc[2, "Energy"] = np.nan
    _rewrite(folder, images, nan_cond)
    with pytest.raises(RSGMError) as e:
        _setup(folder)
    assert_one_line(e, "NaN in columns ['Energy']", "data_cond_photonsum")

    with pytest.raises(RSGMError, match="unknown detector"):
        ZDCDataModule(detector="muon")


def _error(folder, **kw) -> str:
    with pytest.raises(RSGMError) as e:
        _setup(folder, **kw)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_values_that_would_train_to_nan_are_refused(neutron_folder):
    folder, images, cond = neutron_folder
    bad = images.copy()
    bad[7, 1, 2] = np.inf
    _rewrite(folder, bad, cond)
    assert "1 inf pixel values" in _error(folder) and "data_neutron_photonsum" in _error(folder)

    huge = images.astype(np.float64)
    huge[9, 0, 0] = 1e39  # finite in float64, inf once cast to float32
    _rewrite(folder, huge, cond)
    assert "beyond float32's range" in _error(folder)

    inf_cond = cond.copy()
    inf_cond.loc[5, "Pz"] = -np.inf
    _rewrite(folder, images, inf_cond)
    message = _error(folder)
    assert "inf in columns ['Pz']" in message and "data_cond_photonsum" in message

    big_cond = cond.copy()
    big_cond.loc[5, "Energy"] = 1e300
    _rewrite(folder, images, big_cond)
    assert "beyond float32's range in columns ['Energy']" in _error(folder)


def test_conditions_are_paired_with_images_by_index(neutron_folder):
    folder, images, cond = neutron_folder
    order = np.random.default_rng(0).permutation(len(cond))
    _rewrite(folder, images, cond.iloc[order])  # same pairs, rows stored in another order
    dm = ZDCDataModule(path=str(folder), detector="neutron", seed=5, cache=False)
    dm.setup("fit")
    ref = ZDCDataModule(path=None, detector="neutron", seed=5)
    ref._load_arrays = lambda predicting=False: (images, cond, "reference")
    ref.setup("fit")
    assert torch.equal(dm.train_set.tensors["cond"], ref.train_set.tensors["cond"])
    assert torch.equal(dm.train_set.tensors["x"], ref.train_set.tensors["x"])

    shifted = cond.copy()
    shifted.index = shifted.index + 1
    _rewrite(folder, images, shifted)
    assert "not a permutation of 0..499" in _error(folder)


def test_unreadable_files_are_named(neutron_folder):
    folder, images, cond = neutron_folder
    image_file = next(folder.glob("data_neutron_*.pkl"))
    cond_file = next(folder.glob("data_cond_*.pkl"))
    data = cond_file.read_bytes()
    cond_file.write_bytes(data[: len(data) // 2])
    message = _error(folder)
    assert cond_file.name in message and "truncated" in message
    cond_file.write_bytes(b"")
    assert cond_file.name in _error(folder) and "empty" in _error(folder)
    cond_file.write_bytes(data)
    pd_dict = {"not": "an array"}
    import pandas as pd

    pd.to_pickle(pd_dict, image_file)
    assert "images have shape dict" in _error(folder)
    pd.to_pickle(images[:, :, :, None], image_file)
    assert "images have shape (500, 44, 44, 1)" in _error(folder)


def test_too_small_sets_get_one_line(tmp_path):
    images, cond = simulate_zdc(2, "neutron", seed=1)
    write_zdc_pickles(tmp_path, images[:1], cond.iloc[:1], "neutron")
    assert "1 samples give 1 training and 0 test samples" in _error(tmp_path)
    # a last training batch of one sample is dropped (BatchNorm needs two)
    images, cond = simulate_zdc(21, "neutron", seed=1)
    _rewrite(tmp_path, images, cond)
    dm = ZDCDataModule(path=str(tmp_path), cache=False, batch_size=16, test_fraction=0.2)
    dm.setup("fit")
    assert len(dm.train_set) == 17 and [len(b["x"]) for b in dm.train_dataloader()] == [16]


def test_hdf5_layout_reads_like_the_pickles(neutron_folder, tmp_path, caplog):
    import logging

    folder, images, cond = neutron_folder
    caplog.set_level(logging.INFO)
    image_file, cond_file = next(folder.glob("data_neutron_*.pkl")), next(folder.glob("data_cond_*.pkl"))
    convert_pickles_to_hdf5(image_file, cond_file, tmp_path / "zdc.h5", log=logging.getLogger("t").info)
    from_pickles = ZDCDataModule(path=str(folder), seed=3, cache=False)
    from_pickles.setup("fit")
    from_h5 = ZDCDataModule(path=str(tmp_path / "zdc.h5"), seed=3)
    from_h5.setup("fit")
    for key in ("x", "cond", "fdiv", "index"):
        assert torch.equal(from_pickles.train_set.tensors[key], from_h5.train_set.tensors[key])
    assert (tmp_path / ".rsgm_cache").is_dir()
    (tmp_path / "bad.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(RSGMError, match="bad.h5"):
        ZDCDataModule(path=str(tmp_path / "bad.h5")).setup("fit")


def test_pickle_trust_note_is_said_once(neutron_folder, caplog, monkeypatch):
    import logging

    import rsgm.physics.zdc_files as files

    monkeypatch.setattr(files, "_trust_note_said", False)
    folder, _, _ = neutron_folder
    caplog.set_level(logging.INFO)
    _setup(folder)
    _setup(folder)
    assert caplog.text.count("trusted source") == 1


def test_synthetic_default_is_announced(caplog):
    import logging

    caplog.set_level(logging.INFO)
    dm = ZDCDataModule(path=None, n_synthetic=200)
    dm.setup("fit")
    assert "built-in synthetic simulator" in caplog.text
    assert len(dm.train_set) == 160
