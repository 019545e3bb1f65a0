"""End-to-end checks of the B4B LightningModules on a tiny version of the testbed."""
import pandas as pd
import pytest
import torch
from lightning.pytorch import Trainer

from rsgm.callbacks.b4b_probe import LinearProbeCallback
from rsgm.components.encoders import SmallConvEncoder, load_encoder_weights
from rsgm.datamodules.b4b_testbed import B4BTestbedDataModule, build_testbed, shape_images, texture_images
from rsgm.callbacks.b4b_report import B4BReportCallback
from rsgm.lightning_modules.b4b import B4BEncoder, B4BProtocol, StealingModule

TINY_DATA = dict(attack_queries=[300, 600], sybils=[2], sybil_overlap=200, n_shapes=300, n_textures=300, n_task=120, batch_size=100)


@pytest.fixture(scope="module")
def victim_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("victim") / "enc.pt"
    torch.save(SmallConvEncoder(width=8, rep_dim=16).state_dict(), path)
    return str(path)


def test_testbed_is_deterministic_and_tasks_are_disjoint_draws():
    x1, y1, t1 = build_testbed(n_shapes=50, n_textures=50, n_task=40)
    x2, _, t2 = build_testbed(n_shapes=50, n_textures=50, n_task=40)
    assert torch.equal(x1, x2) and torch.equal(t1["shapes"].x_test, t2["shapes"].x_test)
    assert x1.shape[1:] == (1, 16, 16) and 0 <= x1.min() and x1.max() <= 1 and int(y1.max()) == 23
    assert set(t1) == {"digits", "shapes", "textures"}
    assert len(t1["digits"].x_all) == round(0.45 * 1797)
    sx, sy = shape_images(30, 5)
    tx, ty = texture_images(30, 5)
    assert sx.shape == tx.shape == (30, 1, 16, 16) and int(sy.max()) < 6 and int(ty.max()) < 6


def test_b4b_encoder_predict_mixed_users_and_missing_weights(tmp_path, victim_weights):
    enc = SmallConvEncoder(width=8, rep_dim=16)
    with pytest.raises(FileNotFoundError, match="b4b_victim_digits"):
        B4BEncoder(enc, str(tmp_path / "none.pt"))
    model = B4BEncoder(SmallConvEncoder(width=8, rep_dim=16), victim_weights, state_path=str(tmp_path / "s.sqlite"),
                       secret_file=str(tmp_path / "secret.bin"), defense={"transform": "affine+pad", "n_proj": 4, "n_bits": 6})
    x = torch.rand(6, 1, 16, 16)
    out = model.predict_step({"x": x, "user_id": ["a", "b", "a", "b", "a", "a"]}, 0)["representation"]
    assert out.shape == (6, 20)
    clean = SmallConvEncoder(width=8, rep_dim=16)
    load_encoder_weights(clean, victim_weights)
    clean.eval()
    assert not torch.allclose(out[:, :16], clean(x), atol=1e-3)  # the raw representation never leaves
    assert model.defense.store.get("a").n_queries == 4 and model.defense.store.get("b").n_queries == 2


def test_protocol_table_and_stealing_module(tmp_path, victim_weights):
    enc = dict(width=8, rep_dim=16)
    model = B4BProtocol(SmallConvEncoder(**enc), victim_weights, secret="test",
                        defenses={"none": {"noise": "static", "transform": "none"},
                                  "b4b": {"noise": "coverage", "lam": 1e-3, "alpha": 10.0, "beta": 0.1, "transform": "affine"}},
                        attack_rows=["none/attack-300", "b4b/attack-600", "b4b/sybil2x300"],
                        surrogate=SmallConvEncoder(width=4, rep_dim=8), epochs=1, n_proj=4, n_bits=8,
                        remap_grid=[8, 32, 64], remap_holdout=50)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, inference_mode=False,
                      enable_progress_bar=False, default_root_dir=tmp_path, callbacks=[B4BReportCallback()])
    trainer.test(model, datamodule=B4BTestbedDataModule(**TINY_DATA))
    table = pd.read_csv(tmp_path / "b4b_table.csv")
    assert list(table["user"]) == ["Legit", "Legit", "Attack", "Attack", "Sybil"]
    assert list(table["queries"]) == ["ALL", "ALL", "300", "600", "2x300"]
    assert table[["digits", "shapes", "textures"]].notna().all().all()
    fid = pd.read_csv(tmp_path / "b4b_remap_fidelity.csv")
    assert list(fid["n_overlap"]) == [8, 32, 64]
    for name in ("b4b_coverage_vs_queries", "b4b_sigma_vs_coverage", "b4b_remap_fidelity"):
        assert (tmp_path / "plots" / f"{name}.png").is_file()
    # coverage accumulates over an account's history: attack-600 sends a superset of attack-300
    final = {u: tr[-1] for (d, u), tr in model.traces.items() if d == "b4b"}
    assert final["attack-600"][0] == 600 and final["attack-600"][1] >= final["attack-300"][1] > 0
    assert (tmp_path / "b4b_coverage_at_equal_queries.csv").is_file()

    steal = StealingModule(SmallConvEncoder(**enc), victim_weights, SmallConvEncoder(width=4, rep_dim=8), defense="b4b",
                           defense_config={"transform": "affine+pad", "n_proj": 4, "n_bits": 8}, queries=600, n_sybils=2, overlap=200,
                           remap_grid=[8, 64], remap_holdout=50)
    dm = B4BTestbedDataModule(**{**TINY_DATA, "sybils": []})
    t2 = Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                 enable_progress_bar=False, default_root_dir=tmp_path / "steal", callbacks=[LinearProbeCallback()])
    t2.fit(steal, datamodule=dm)
    assert steal.surrogate.project[-1].out_features == 20  # resized to the padded answers
    assert {"probe/digits", "probe/shapes", "probe/textures"} <= set(t2.callback_metrics)
    assert [f["n_overlap"] for f in steal.remap_fidelity] == [8, 64]


@pytest.mark.slow
def test_stealing_over_http_against_a_live_server(tmp_path, victim_weights):
    from serving_helpers import Server, write_config

    path, _ = write_config(tmp_path, encoder_weights=victim_weights, api_keys={"k0": "mallory-0", "k1": "mallory-1"},
                           defense={"noise": "coverage", "lam": 1e-3, "alpha": 10.0, "beta": 0.1, "transform": "affine",
                                    "n_proj": 4, "n_bits": 8})
    srv = Server(path)
    try:
        steal = StealingModule(None, None, SmallConvEncoder(width=4, rep_dim=8), queries=600, n_sybils=2, overlap=200,
                               remap_grid=[8, 64], remap_holdout=50, endpoint=f"http://{srv.addr}", api_keys=["k0", "k1"],
                               query_batch=64)
        dm = B4BTestbedDataModule(**{**TINY_DATA, "sybils": []})
        t = Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, default_root_dir=tmp_path / "steal", callbacks=[LinearProbeCallback()])
        t.fit(steal, datamodule=dm)
    finally:
        srv.stop()
    assert {"probe/digits", "probe/shapes", "probe/textures"} <= set(t.callback_metrics)
    assert steal.surrogate.project[-1].out_features == 16 and len(steal._data) == 200 + 2 * 100  # shared + own
    assert [f["n_overlap"] for f in steal.remap_fidelity] == [8, 64]
    from rsgm.defenses.lsh import LSHCoverage
    from rsgm.defenses.store import UserStateStore

    store = UserStateStore(tmp_path / "state" / "s.sqlite", LSHCoverage(16, 4, 8))
    assert store.get("mallory-0").n_queries == 300 and store.get("mallory-1").n_queries == 300  # charged server-side
