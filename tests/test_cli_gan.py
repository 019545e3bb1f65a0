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
    "synthetic2d/dcgan.yaml": ["--data.n_per_condition", "20"],
    "synthetic2d/msgan.yaml": ["--data.n_per_condition", "20"],
    "sdigan_synthetic2d.yaml": ["--data.n_per_condition", "20"],
}


@pytest.mark.parametrize("config", sorted(FAST))
def test_fast_dev_run_of_every_config(config, tmp_path):
    # An overlay in configs/synthetic2d/ goes on top of its base, sdigan_synthetic2d.yaml.
    files = [CONFIGS / "sdigan_synthetic2d.yaml", CONFIGS / config] if config.startswith("synthetic2d/") else [CONFIGS / config]
    main(["fit", *[a for f in files for a in ("--config", str(f))], "--trainer.fast_dev_run", "true", "--logger", "none",
          "--run_dir", str(tmp_path), *FAST[config]])


def run_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*") if p.is_dir())


def test_fit_then_test_with_wandb_offline(tmp_path):
    from rsgm.utils.dashboard import read_offline_run

    args = ["--config", str(CONFIGS / "quickstart.yaml"), "--run_dir", str(tmp_path), "--run_name", "q",
            "--data.n_synthetic", "600", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1",
            "--data.eval_batch_size", "64"]
    main(["fit", *args])
    (run,) = run_dirs(tmp_path)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["init_args"]["diversity"] == "selective"
    (offline,) = (run / "wandb").glob("offline-run-*")
    fit = read_offline_run(offline)
    assert fit["run"]["group"] == "q" and fit["run"]["job_type"] == "fit" and fit["run"]["tags"] == ["zdc"]
    # the config once, nested (not again flattened from the module's hyperparameters)
    assert fit["config"]["model"]["init_args"]["diversity"] == "selective" and "diversity" not in fit["config"]
    val = [h for h in fit["history"] if "val/w1_mean" in h]
    images = [h for h in fit["history"] if "plots/val_channels_epoch000" in h]
    assert val and images and images[0]["trainer/global_step"] == val[0]["trainer/global_step"] > 0
    assert fit["summary"]["val/w1_mean"] == {"min": pytest.approx(val[0]["val/w1_mean"])}
    assert list(offline.glob("files/media/images/plots/val_channels_epoch000*.png"))

    import os

    os.environ.pop("RSGM_RUN_DIR")
    main(["test", *args, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    test_run = [p for p in run_dirs(tmp_path) if p.name.startswith("test-")][0]
    result = json.loads((test_run / "test_channel_w1.json").read_text())
    assert result["test/w1_mean"] > 0 and len(result["test/quartile_edges"]) == 5
    # CaloChallenge-style fidelity at test, with no config change.
    assert all(0 <= result[f"test/auc_{level}"] <= 1 for level in ("low", "high"))
    assert result["test/fpd"] >= 0 and result["test/fpd_err"] >= 0 and "test/kpd" in result
    assert {p.name.split("_epoch")[0] for p in test_run.glob("plots/*.png")} == {"test_channels", "test_samples"}
    (offline,) = (test_run / "wandb").glob("offline-run-*")
    test = read_offline_run(offline)
    assert test["run"]["group"] == "q" and test["run"]["job_type"] == "test"
    assert any(h.get("test/w1_mean") == pytest.approx(result["test/w1_mean"]) for h in test["history"])
    tables = [h["tables/test_channel_w1"] for h in test["history"] if "tables/test_channel_w1" in h]
    assert tables and tables[0]["_type"] == "table-file"
    table = json.loads((offline / "files" / tables[0]["path"]).read_text())
    row = dict(zip(table["columns"], table["data"][0]))
    assert row["test/w1_mean"] == pytest.approx(result["test/w1_mean"])


def test_unknown_config_key_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    lamda_div: 0.3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(bad), "--logger", "none"])
    message = str(exit_info.value.code)
    assert "\n" not in message and "lamda_div" in message and "not accepted" in message


def test_wrong_type_names_the_key_and_the_value(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.max_epochs", "abc", "--logger", "none"])
    message = str(exit_info.value.code)
    assert "\n" not in message and "trainer.max_epochs" in message and "int" in message and "abc" in message


def test_data_detector_is_set_once_for_the_model_parts(tmp_path):
    # the README's override: the generator, discriminator (and aux regressor) follow data.detector
    main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--data.detector", "proton", "--data.n_synthetic", "200",
          "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
          "--data.eval_batch_size", "16", "--logger", "csv", "--run_dir", str(tmp_path)])
    (run,) = run_dirs(tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]
    assert config["generator"]["init_args"]["detector"] == config["discriminator"]["init_args"]["detector"] == "proton"


def generator_state(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
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
    main(["fit", *common, "--run_dir", str(tmp_path / "part"), "--trainer.max_epochs", "3",
          "--ckpt_path", str(first / "checkpoints" / "last.ckpt")])
    # the resumed training continues in the same run folder, which keeps one checkpoint
    (full,), (resumed,) = run_dirs(tmp_path / "full"), run_dirs(tmp_path / "part")
    assert resumed == first and [p.name for p in (resumed / "checkpoints").iterdir()] == ["last.ckpt"]
    a, b = generator_state(full), generator_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ctrl_c_saves_a_checkpoint_and_the_printed_command_resumes_the_same_run(tmp_path, monkeypatch, capsys):
    import os
    import shlex

    from rsgm.utils.run_folder import RunGuard

    def interrupt(self, trainer, *args):
        if trainer.global_step == 4 and not getattr(self, "fired", False):
            self.fired = True
            raise KeyboardInterrupt

    monkeypatch.setattr(RunGuard, "on_train_batch_end", interrupt, raising=False)
    argv = ["fit", "--config", str(CONFIGS / "sdigan_synthetic2d.yaml"), "--data.n_per_condition", "30",
            "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "2", "--run_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 1
    (run,) = run_dirs(tmp_path)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    wandb_id = (run / "wandb_id").read_text()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["rsgm_wandb_id"] == wandb_id
    err = capsys.readouterr().err
    command = err.split("Resume with:")[1].strip().splitlines()[0]
    resume = shlex.split(command)
    assert resume[0] == "rsgm" and resume[-2] == "--ckpt_path" and resume[-1] == str((run / "checkpoints" / "last.ckpt").resolve())
    monkeypatch.undo()  # also undoes conftest's delenv (same monkeypatch): clear the run folder after it
    os.environ.pop("RSGM_RUN_DIR", None)
    main(resume[1:])
    assert run_dirs(tmp_path) == [run] and (run / "wandb_id").read_text() == wandb_id
    # both pieces are offline runs of the one W&B run id
    # (a piece started in the same second as the first gets a numeric suffix after the id)
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline and all(f"-{wandb_id}" in p.name for p in offline)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
