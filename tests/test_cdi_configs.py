"""The chapter 8 overlays through the rsgm command: CLiD + extract-only + the progress target
on a one-step checkpoint (fast_dev_run), the studies overlay's callback arguments, and the
DiT config with CLiD stopping in one line without its data."""

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from rsgm.cli import main
from rsgm.privacy.features_cache import load_features_cache

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def cfg(*names):
    return [a for n in names for a in ("--config", str(CONFIGS / n))]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch
    from lightning.pytorch import Trainer

    from rsgm.datamodules.membership import DigitsDiffusionData
    from rsgm.lightning_modules.diffusion import ClassConditionalDiffusion

    tmp = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = ClassConditionalDiffusion(block_out_channels=(8, 16), export_dir=str(tmp / "export"))
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp), enable_checkpointing=False)
    trainer.fit(model, datamodule=DigitsDiffusionData(n_members=16, batch_size=16))
    trainer.save_checkpoint(tmp / "epoch000.ckpt")
    return tmp


def test_progress_clid_extract_only_fast_dev_run(checkpoint, tmp_path):
    cache = tmp_path / "f.safetensors"
    main(["test", *cfg("cdi_digits.yaml", "cdi_digits_progress.yaml", "cdi_clid.yaml", "cdi_extract_only.yaml"),
          "--model.target.init_args.checkpoint", str(checkpoint / "epoch000.ckpt"),
          "--data.init_args.split_file", str(checkpoint / "export" / "membership.json"),
          "--data.init_args.n_suspect", "16", "--data.init_args.n_reference", "20", "--data.init_args.batch_size", "6",
          "--model.feature_options", "{gm_timesteps: [100], ml_timesteps: [100], clid_timesteps: [0, 500], secmi_t: 20, no_steps: 1}",
          "--model.features_cache", str(cache), "--trainer.fast_dev_run", "true", "--logger", "none", "--run_dir", str(tmp_path)])
    data = load_features_cache(cache)
    assert data["names"][-2:] == ["clid_t0", "clid_t500"] and "pia" in data["names"] and len(data["index"]) == 6
    assert not list(tmp_path.glob("*/*/cdi"))  # extract-only: no statistics ran


def test_studies_overlay_configures_the_callback():
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        main(["test", *cfg("cdi_digits.yaml", "cdi_digits_studies.yaml", "cdi_pia_l2.yaml"), "--print_config"])
    conf = yaml.safe_load(out.getvalue())
    (di,) = [c["init_args"] for c in conf["trainer"]["callbacks"] if c["class_path"].endswith("DatasetInference")]
    assert di["u_ratios"] == [1.0, 0.9, 0.75, 0.5, 0.25, 0.1] and di["roc_sizes"] == [10, 30, 100]
    assert "pairs" in di["ablation_sets"] and "existing_singles" in di["ablation_sets"]
    assert conf["model"]["init_args"]["feature_options"]["pia_p"] == 2.0


def test_dit_with_clid_fails_in_one_line_without_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        main(["test", *cfg("cdi_dit256.yaml", "cdi_clid.yaml"), "--logger", "none", "--run_dir", str(tmp_path)])
    msg = str(err.value)
    assert "\n" not in msg and "imagenet" in msg.lower()
