"""`rsgm predict --output`: simulated ZDC responses written to HDF5 / the published pickles,
in photon counts, in the order of the conditions, from one or two (DDP) processes; and
compiled generation against eager."""

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch import Trainer

from rsgm.callbacks.prediction_writer import ZDCPredictionWriter, merge_parts, read_predictions
from rsgm.components.gan import CompiledForInference, ZDCDiscriminator, ZDCGenerator
from rsgm.datamodules.zdc import ZDCDataModule
from rsgm.errors import RSGMError
from rsgm.lightning_modules.expertsim import ExpertSim
from rsgm.lightning_modules.sdi_gan import ConditionalGAN
from rsgm.physics.simulator import CONDITION_COLUMNS, simulate_zdc
from rsgm.physics.zdc_files import HDF5Appender
from zdc_echo import EchoGenerator

ROOT = Path(__file__).resolve().parents[1]


def particles(tmp_path, n=20, first_index=100):
    _, cond = simulate_zdc(n, "neutron", seed=7)
    cond.index = np.arange(first_index, first_index + n)  # a particle id the output keeps
    path = tmp_path / "particles.pkl"
    cond.to_pickle(path)
    return path, cond


def echo_counts(raw: np.ndarray, dm: ZDCDataModule) -> np.ndarray:
    """What EchoGenerator writes for raw conditions, in photon counts."""
    return np.expm1(np.abs((raw[:, 0] - dm.condition_mean[0]) / dm.condition_std[0]))


def predict(model, dm, output, **trainer_kw):
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      callbacks=[ZDCPredictionWriter(str(output))], **trainer_kw)
    return trainer.predict(model, dm)


def test_hdf5_round_trip_order_units_and_samples(tmp_path):
    path, cond = particles(tmp_path)
    dm = ZDCDataModule(n_synthetic=300, conditions_file=str(path), samples_per_condition=3, eval_batch_size=16)
    model = ConditionalGAN(EchoGenerator(noise_scale=1.0), ZDCDiscriminator())
    assert predict(model, dm, tmp_path / "showers.h5") is None  # kept in the file, not in memory
    with h5py.File(tmp_path / "showers.h5") as f:
        assert f.attrs["units"] == "photons" and f.attrs["detector"] == "neutron"
        assert f["images"].dtype == np.float32 and f["images"].compression == "gzip" and f["images"].chunks is not None
        assert "position" not in f and "expert" not in f
    images, table = read_predictions(tmp_path / "showers.h5")
    assert images.shape == (60, 44, 44)
    np.testing.assert_array_equal(table["index"], np.repeat(cond.index, 3))
    np.testing.assert_array_equal(table["sample"], np.tile([0, 1, 2], 20))
    raw = cond[list(CONDITION_COLUMNS)].to_numpy()
    np.testing.assert_array_equal(table[list(CONDITION_COLUMNS)].to_numpy(), np.repeat(raw, 3, axis=0))
    # Every response belongs to its own condition, in photon counts (expm1 of the model space),
    # and the samples of one condition differ (fresh noise per row).
    base = np.repeat(echo_counts(raw, dm), 3)
    assert np.all(images[:, 0, 0] >= base * (1 - 1e-5))
    assert np.all(images.reshape(60, -1).std(1) < 1e-3 * (1 + images.reshape(60, -1).mean(1)))
    assert len(np.unique(images[:3, 0, 0])) == 3
    # The written file is readable as ZDC data again.
    again = ZDCDataModule(path=str(tmp_path / "showers.h5"), cache=False)
    again.setup("fit")
    assert len(again.train_set) + len(again.test_set) == 60


def test_pickle_output_from_the_test_split_with_experts(tmp_path):
    dm = ZDCDataModule(n_synthetic=200, eval_batch_size=16)
    model = ExpertSim(EchoGenerator(), ZDCDiscriminator(), None, n_experts=3, lambda_aux=0.0)
    predict(model, dm, tmp_path / "showers.pkl")
    images = pd.read_pickle(tmp_path / "showers.pkl")
    table = pd.read_pickle(tmp_path / "showers_cond.pkl")
    assert isinstance(images, np.ndarray) and images.shape == (40, 44, 44) and images.dtype == np.float32
    assert list(table.index) == list(range(40))
    all_images, all_cond = simulate_zdc(200, "neutron", seed=0)
    test_rows = dm.test_set.tensors["index"].numpy()
    np.testing.assert_array_equal(table["index"], test_rows)
    np.testing.assert_allclose(table[list(CONDITION_COLUMNS)].to_numpy(), all_cond.to_numpy()[test_rows])
    np.testing.assert_allclose(images[:, 5, 7], echo_counts(all_cond.to_numpy()[test_rows], dm), rtol=1e-5)
    assert set(table["expert"]) <= {0, 1, 2} and len(set(table["expert"])) > 1


def _part(path, positions, detector="neutron", expert=True):
    with HDF5Appender(path, detector) as w:
        pos = np.asarray(positions)
        images = np.broadcast_to(pos[:, None, None].astype(np.float32), (len(pos), 44, 44))
        fields = {"index": pos * 10, "sample": pos % 2, "position": pos}
        if expert:
            fields["expert"] = pos % 3
        w.append(images, np.repeat(pos[:, None].astype(float), 9, axis=1), **fields)


def test_merge_puts_interleaved_rank_parts_in_order(tmp_path):
    # DistributedSampler-style interleaving: rank 0 has even, rank 1 odd positions.
    _part(tmp_path / "p0.h5", range(0, 11, 2))
    _part(tmp_path / "p1.h5", range(1, 11, 2))
    for out in ("merged.h5", "merged.pkl"):
        n = merge_parts([tmp_path / "p0.h5", tmp_path / "p1.h5"], tmp_path / out, block=4)
        assert n == 11
        images, table = read_predictions(tmp_path / out)
        np.testing.assert_array_equal(images[:, 3, 3], np.arange(11))
        np.testing.assert_array_equal(table["index"], np.arange(11) * 10)
        np.testing.assert_array_equal(table["expert"], np.arange(11) % 3)
        np.testing.assert_array_equal(table["Energy"], np.arange(11))
        assert not (tmp_path / "p0.h5").exists()
        _part(tmp_path / "p0.h5", range(0, 11, 2))
        _part(tmp_path / "p1.h5", range(1, 11, 2))
    (tmp_path / "p1.h5").unlink()
    with pytest.raises(RuntimeError, match="cover 6 of 11"):
        merge_parts([tmp_path / "p0.h5"], tmp_path / "x.h5")


@pytest.mark.parametrize("case", ["nan", "inf", "missing", "empty"])
def test_bad_conditions_give_one_line_errors(tmp_path, case):
    _, cond = simulate_zdc(10, "neutron", seed=1)
    if case == "nan":
        cond.loc[3, "Px"] = np.nan
    elif case == "inf":
        cond.loc[4, "Energy"] = np.inf
    elif case == "missing":
        cond = cond.drop(columns=["Vz"])
    else:
        cond = cond.iloc[:0]
    path = tmp_path / "mine.pkl"
    cond.to_pickle(path)
    with pytest.raises(RSGMError) as e:
        ZDCDataModule(conditions_file=str(path)).setup("predict")
    message = str(e.value)
    assert "\n" not in message and "mine.pkl" in message
    assert {"nan": "NaN in columns ['Px']", "inf": "inf in columns ['Energy']", "missing": "lack the columns ['Vz']",
            "empty": "empty"}[case] in message


def test_writer_refuses_other_outputs_and_models(tmp_path):
    with pytest.raises(RSGMError, match=r"\.h5"):
        ZDCPredictionWriter(str(tmp_path / "showers.csv"))


def test_compile_falls_back_to_eager_once(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(CompiledForInference, "_fallback_said", False)
    messages = []
    torch.manual_seed(0)
    gen = ZDCGenerator(width=0.125).eval()
    eager = ConditionalGAN(gen, ZDCDiscriminator())
    compiled = ConditionalGAN(gen, ZDCDiscriminator(), compile_generator=True)
    compiled._compiled = CompiledForInference(gen, log=messages.append)
    cond = torch.randn(8, 9)
    for _ in range(2):
        a, _ = eager.simulate(cond, torch.Generator().manual_seed(1))
        b, _ = compiled.simulate(cond, torch.Generator().manual_seed(1))
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-3)  # the eager fallback runs the fused form
    assert len(messages) == 1 and "eager" in messages[0] and "no compiler here" in messages[0]
    assert compiled.state_dict().keys() == eager.state_dict().keys()


@pytest.mark.slow
def test_compiled_generation_matches_eager():
    torch.manual_seed(0)
    gen = ZDCGenerator(width=0.125)
    experts = ExpertSim(gen, ZDCDiscriminator(), None, n_experts=2, lambda_aux=0.0, compile_generator=True).eval()
    eager = ExpertSim(gen, ZDCDiscriminator(), None, n_experts=2, lambda_aux=0.0).eval()
    eager.load_state_dict(experts.state_dict())
    cond = torch.randn(70, 9)
    for n in (70, 33, 1):  # one dynamic-shape compilation serves all batch sizes
        a, ea = eager.simulate(cond[:n], torch.Generator().manual_seed(3))
        b, eb = experts.simulate(cond[:n], torch.Generator().manual_seed(3))
        assert torch.equal(ea, eb)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-3)  # photon counts up to ~4000
    if any(e._compiled.failed for e in experts.experts):
        pytest.skip("torch.compile is unavailable on this machine (eager fallback was used)")


@pytest.mark.slow
def test_two_ddp_processes_write_one_ordered_file(tmp_path):
    path, cond = particles(tmp_path, n=37)
    out = tmp_path / "showers.h5"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    env.pop("RSGM_RUN_DIR", None)
    cmd = [sys.executable, "-m", "rsgm.cli", "predict", "--config", str(ROOT / "configs" / "expertsim.yaml"),
           "--model.generator", "zdc_echo.EchoGenerator", "--model.n_experts", "2", "--model.lambda_aux", "0",
           "--model.aux_regressor", "null", "--data.n_synthetic", "300", "--data.conditions_file", str(path),
           "--data.samples_per_condition", "2", "--data.eval_batch_size", "8", "--trainer.accelerator", "cpu",
           "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.callbacks", "[]", "--logger", "none",
           "--run_dir", str(tmp_path / "runs"), "--output", str(out), "--allow_untrained", "true"]  # echo experts, untrained router
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    images, table = read_predictions(out)
    assert images.shape == (74, 44, 44)
    np.testing.assert_array_equal(table["index"], np.repeat(cond.index, 2))
    np.testing.assert_array_equal(table["sample"], np.tile([0, 1], 37))
    np.testing.assert_array_equal(table["Energy"], np.repeat(cond["Energy"].to_numpy(), 2))
    dm = ZDCDataModule(n_synthetic=300)
    dm.setup("fit")
    np.testing.assert_allclose(images[:, 0, 0], np.repeat(echo_counts(cond.to_numpy(), dm), 2), rtol=1e-5)
    assert not list(tmp_path.glob(".showers.h5.part*"))


def test_evaluation_and_predict_noise_depend_on_the_sample_index_only():
    """ExpertSim's evaluation and predict outputs (noise and routing) for a sample are the same
    whatever batch it comes in, so 1 and 2 processes, or any batch size, give one result."""
    torch.manual_seed(0)
    model = ExpertSim(ZDCGenerator(width=0.125), ZDCDiscriminator(), None, n_experts=3, lambda_aux=0.0).eval()
    with torch.no_grad():
        model.router.net[-1].bias.copy_(torch.tensor([0.0, 0.3, -0.3]))  # routing is a draw, not a tie
        for expert in model.experts:
            expert.generator.convs[-2].bias.fill_(1.0)  # outputs off the clip at 0 photons
    n = 12
    batch = {"x": torch.rand(n, 1, 44, 44), "cond": torch.randn(n, 9), "index": torch.arange(100, 100 + n)}
    whole = model.generate(batch)
    parts = [model.generate({k: v[s] for k, v in batch.items()}) for s in (slice(0, 5), slice(5, n))]
    torch.testing.assert_close(torch.cat([p["fake"] for p in parts]), whole["fake"])
    assert torch.equal(torch.cat([p["expert"] for p in parts]), whole["expert"])
    assert len(set(whole["expert"].tolist())) > 1  # routing draws differ between samples
    shuffled = torch.randperm(n)  # order within a batch does not matter either
    again = model.generate({k: v[shuffled] for k, v in batch.items()})
    torch.testing.assert_close(again["fake"], whole["fake"][shuffled])
    pred_whole = model.predict_step({"cond": batch["cond"], "index": batch["index"]}, 0)
    pred_part = model.predict_step({"cond": batch["cond"][5:], "index": batch["index"][5:]}, 1)
    torch.testing.assert_close(pred_part["fake"], pred_whole["fake"][5:])
    torch.testing.assert_close(pred_whole["fake"], whole["fake"])  # same seed, same index: same draws
    assert not torch.equal(whole["fake"][0], whole["fake"][1])
