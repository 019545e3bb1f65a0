"""The IAR attack module and report end to end on tiny random targets; DDP equality (slow)."""

import json

import pytest
import torch
from lightning.pytorch import Trainer

from rsgm.callbacks.iar_report import IARReport
from rsgm.components.iar import MaskedIAR, RasterIAR
from rsgm.components.iar_adapters import BuiltinIARTarget
from rsgm.datamodules.membership import DigitsMembership
from rsgm.lightning_modules.iar_attack import IARAttack


def run(tmp_path, devices=1, model=None, callbacks=(), **kw):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    target = BuiltinIARTarget(model=(model or RasterIAR(dim=16, depth=1)).eval())
    module = IARAttack(target=target, feature_options={"draws": 4, **kw.pop("feature_options", {})}, **kw)
    data = DigitsMembership(n_suspect=30, n_reference=41, batch_size=16)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", logger=False,
                      default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, callbacks=list(callbacks))
    trainer.test(module, datamodule=data)
    return torch.load(tmp_path / "iar_features.pt", weights_only=True), module


def test_module_and_report_end_to_end(tmp_path):
    report = IARReport(repeats=3, trials=20, null_trials=50, linear_trials=10)
    res, module = run(tmp_path, callbacks=[report], extraction={"per_class": 1, "prefix_len": 16},
                      utility_per_class=2, feature_options={"logit_noise": [1.0]},
                      sampling_sweep=[{"temperature": 0.0}, {"temperature": 0.5, "cfg": 1.0}])
    assert len(res["index"]) == 71 and res["features"].shape == (71, len(res["names"]))
    assert res["calls"]["forward"] == 2 * 71  # conditional + null pass per sample, nothing else during scoring
    assert {n.split("_")[0] for n in res["names"]} == {"cond", "cfg"} and 1.0 in res["noisy"]
    summary = json.loads((tmp_path / "iar" / "summary.json").read_text())
    assert summary["forward_passes_per_sample"] == 2.0
    assert summary["extraction_validation_false_positives"] == 0
    for f in ("mia.csv", "di.csv", "di_null.json", "mitigation.csv", "extraction.json", "sampling_sweep.csv"):
        assert (tmp_path / "iar" / f).is_file(), f
    assert summary["mitigation_sigma0_fid"] > 0 and summary["fid_real_floor"] >= 0
    assert [set(r) for r in res["sampling_sweep"]] == [{"temperature", "accuracy", "fid"}, {"temperature", "cfg", "accuracy", "fid"}]
    assert (tmp_path / "plots" / "iar_roc.png").is_file()
    # the statistics re-run from the saved features without the model
    cached = IARAttack(target=BuiltinIARTarget(model=RasterIAR(dim=16, depth=1)), features_cache=str(tmp_path / "iar_features.pt"))
    trainer = Trainer(accelerator="cpu", logger=False, default_root_dir=str(tmp_path / "again"), enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, callbacks=[IARReport(repeats=3, trials=20, null_trials=50, linear_trials=10)])
    trainer.test(cached, datamodule=DigitsMembership(n_suspect=30, n_reference=41, batch_size=16))
    again = json.loads((tmp_path / "again" / "iar" / "summary.json").read_text())
    assert again["best_cfg_tpr"] == summary["best_cfg_tpr"] and again["di_sum_cond_cfg"] == summary["di_sum_cond_cfg"]


def test_masked_target_features_and_token_noise(tmp_path):
    report = IARReport(repeats=3, trials=20, null_trials=50, linear_trials=10, mitigation_repeats=3)
    res, _ = run(tmp_path, model=MaskedIAR(dim=16, depth=1, head_width=16), utility_per_class=0, callbacks=[report],
                 feature_options={"token_noise": [0.5]}, extraction={"per_class": 1, "prefix_len": 4})
    assert res["kind"] == "masked" and not any("hinge" in n or "surp" in n for n in res["names"])
    assert res["calls"]["forward"] == 2 * 71 and res["calls"]["forward_defended"] == 2 * 71
    assert res["calls"]["head"] == 2 * 2 * 71 * 4
    assert res["noisy"][0.5].shape == res["features"].shape and not torch.allclose(res["noisy"][0.5], res["features"], equal_nan=True)
    ext = json.loads((tmp_path / "iar" / "extraction.json").read_text())
    assert ext["validation_false_positives"] == 0 and ext["candidates"] == 10  # one per digit class
    rows = (tmp_path / "iar" / "mitigation.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[2].startswith("0.5,")


def test_noise_grid_of_the_other_kind_rejected():
    with pytest.raises(ValueError, match="logit_noise does not apply to a masked target"):
        IARAttack(target=BuiltinIARTarget(model=MaskedIAR(dim=16, depth=1, head_width=16)), feature_options={"logit_noise": [1.0]})
    with pytest.raises(ValueError, match="token_noise does not apply to a token target"):
        IARAttack(target=BuiltinIARTarget(model=RasterIAR(dim=16, depth=1)), feature_options={"token_noise": [1.0]})


@pytest.mark.slow
def test_ddp_two_processes_give_the_same_scores(tmp_path):
    one, _ = run(tmp_path / "one", 1, utility_per_class=0)
    two, _ = run(tmp_path / "two", 2, utility_per_class=0)  # 71 samples over 2 ranks: one padded duplicate
    assert one["names"] == two["names"] and len(two["index"]) == 71
    torch.testing.assert_close(two["index"], one["index"])
    torch.testing.assert_close(two["features"], one["features"], rtol=1e-5, atol=1e-7, equal_nan=True)
