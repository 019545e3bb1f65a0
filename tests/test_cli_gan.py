"""The rsgm command on the foundation configs: fast_dev_run, logging, resume, bad keys."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from rsgm.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Small data overrides so every config's fast_dev_run takes seconds.
FAST = {
    "quickstart.yaml": ["--data.n_synthetic", "400"],
    "sdigan_zdc.yaml": ["--data.n_synthetic", "400", "--data.batch_size", "16"],
    "dcgan_synthetic2d.yaml": ["--data.n_per_condition", "20"],
    "msgan_synthetic2d.yaml": ["--data.n_per_condition", "20"],
    "sdigan_synthetic2d.yaml": ["--data.n_per_condition", "20"],
}


@pytest.mark.parametrize("config", sorted(FAST))
def test_fast_dev_run_of_every_config(config, tmp_path):
    main(["fit", "--config", str(CONFIGS / config), "--trainer.fast_dev_run", "true", "--logger", "none",
          "--run_dir", str(tmp_path), *FAST[config]])


def run_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*") if p.is_dir())


def test_fit_then_test_with_wandb_offline(tmp_path):
    args = ["--config", str(CONFIGS / "quickstart.yaml"), "--run_dir", str(tmp_path), "--run_name", "q",
            "--data.n_synthetic", "600", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1",
            "--data.eval_batch_size", "64"]
    main(["fit", *args])
    (run,) = run_dirs(tmp_path)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["init_args"]["diversity"] == "selective"
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline, "W&B should write an offline run under the run folder"
    assert list(run.glob("plots/*.png")) == [] or all(p.stat().st_size > 0 for p in run.glob("plots/*.png"))

    import os

    os.environ.pop("RSGM_RUN_DIR")
    main(["test", *args, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--logger", "csv"])
    test_run = [p for p in run_dirs(tmp_path) if p.name.startswith("test-")][0]
    result = json.loads((test_run / "test_channel_w1.json").read_text())
    assert result["test/w1_mean"] > 0 and len(result["test/quartile_edges"]) == 5
    # CaloChallenge-style fidelity at test, with no config change.
    assert all(0 <= result[f"test/auc_{level}"] <= 1 for level in ("low", "high"))
    assert result["test/fpd"] >= 0 and result["test/fpd_err"] >= 0 and "test/kpd" in result
    assert {p.name.split("_epoch")[0] for p in test_run.glob("plots/*.png")} == {"test_channels", "test_samples"}
    assert (test_run / "metrics.csv").is_file()


def test_unknown_config_key_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    lamda_div: 0.3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(bad), "--logger", "none"])
    message = str(exit_info.value.code)
    assert "\n" not in message and "lamda_div" in message and "not accepted" in message


def test_generator_and_data_detector_must_match(tmp_path):
    with pytest.raises(ValueError, match="set the same detector"):
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--data.detector", "proton", "--data.n_synthetic", "200",
              "--trainer.fast_dev_run", "true", "--logger", "none", "--run_dir", str(tmp_path)])


def generator_state(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("generator.")}


def test_resume_from_last_checkpoint_matches_uninterrupted_run(tmp_path):
    import os

    common = ["--config", str(CONFIGS / "sdigan_synthetic2d.yaml"), "--data.n_per_condition", "30", "--logger", "none",
              "--trainer.enable_progress_bar", "false", "--trainer.check_val_every_n_epoch", "1"]
    main(["fit", *common, "--run_dir", str(tmp_path / "full"), "--trainer.max_epochs", "3"])
    os.environ.pop("RSGM_RUN_DIR")
    main(["fit", *common, "--run_dir", str(tmp_path / "part"), "--trainer.max_epochs", "1"])
    (first,) = run_dirs(tmp_path / "part")
    os.environ.pop("RSGM_RUN_DIR")
    main(["fit", *common, "--run_dir", str(tmp_path / "resumed"), "--trainer.max_epochs", "3",
          "--ckpt_path", str(first / "checkpoints" / "last.ckpt")])
    (full,), (resumed,) = run_dirs(tmp_path / "full"), run_dirs(tmp_path / "resumed")
    a, b = generator_state(full), generator_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
