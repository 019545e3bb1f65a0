"""A new user's mistakes, one by one: each ends in one line `rsgm: <problem and fix>`, exit
status 1, no traceback and no run folder left behind."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rsgm.cli import EXTRA_COMMANDS, LIGHTNING_COMMANDS, main, usage
from rsgm.errors import RSGMError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def one_line_error(argv: list[str], tmp_path: Path) -> str:
    """Run ``rsgm argv`` in-process; return its one-line message after checking exit status 1
    (SystemExit with a message string) and that no run folder is left."""
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as info:
        main([*argv, "--run_dir", str(runs)] if argv[0] != "serve" else argv)
    message = info.value.code
    assert isinstance(message, str) and message.startswith("rsgm: ") and "\n" not in message, message
    assert not runs.exists() or not any(runs.rglob("*")), f"run folder left behind: {list(runs.rglob('*'))}"
    os.environ.pop("RSGM_RUN_DIR", None)
    return message


def test_test_without_checkpoint_refuses_random_weights(tmp_path):
    msg = one_line_error(["test", "--config", str(CONFIGS / "sdigan_synthetic2d.yaml"), "--logger", "wandb"], tmp_path)
    assert "--ckpt_path" in msg and "random weights" in msg and "--allow_untrained true" in msg
    for sub in ("validate", "predict"):
        assert "random weights" in one_line_error([sub, "--config", str(CONFIGS / "quickstart.yaml")], tmp_path)


def test_allow_untrained_runs_the_smoke_test(tmp_path):
    main(["test", "--config", str(CONFIGS / "sdigan_synthetic2d.yaml"), "--allow_untrained", "true", "--logger", "none",
          "--data.n_per_condition", "20", "--trainer.limit_test_batches", "2", "--run_dir", str(tmp_path)])
    assert list(tmp_path.glob("sdigan_synthetic2d/test-*/test_synthetic2d.json"))


def test_abbreviated_option_is_refused(tmp_path):
    msg = one_line_error(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.max_epoch", "1"], tmp_path)
    assert "--trainer.max_epoch" in msg


def test_missing_data_folder(tmp_path):
    msg = one_line_error(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--data.path", str(tmp_path / "zdc")], tmp_path)
    assert str(tmp_path / "zdc") in msg and "data.path" in msg


def test_missing_checkpoint(tmp_path):
    msg = one_line_error(["test", "--config", str(CONFIGS / "quickstart.yaml"), "--ckpt_path", "runs/nope/last.ckpt"], tmp_path)
    assert "runs/nope/last.ckpt not found" in msg and "last.ckpt" in msg


def test_cdi_before_target_is_trained_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # another directory: relative config paths still resolve against the repository
    msg = one_line_error(["test", "--config", str(CONFIGS / "cdi_digits.yaml"), "--data.split_file", "models/absent/membership.json"],
                         tmp_path)
    assert str(ROOT / "models" / "absent" / "membership.json") in msg and "rsgm fit --config configs/dm_digits.yaml" in msg


def test_existing_export_is_not_overwritten(tmp_path):
    export = tmp_path / "dm_digits"
    export.mkdir()
    msg = one_line_error(["fit", "--config", str(CONFIGS / "dm_digits.yaml"), "--model.export_dir", str(export)], tmp_path)
    assert str(export) in msg and "--overwrite true" in msg


def test_serve_with_missing_config(tmp_path):
    assert "configs/b4b_serve.yaml" in one_line_error(["serve", "--config", str(tmp_path / "serve.yaml")], tmp_path)


def test_debug_keeps_the_traceback(tmp_path):
    with pytest.raises(RSGMError):
        main(["test", "--config", str(CONFIGS / "quickstart.yaml"), "--debug", "--run_dir", str(tmp_path)])


def test_b4b_before_victim_exists_is_one_line_on_stderr(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RSGM_RUN_DIR"} | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "rsgm.cli", "test", "--config", str(CONFIGS / "b4b_digits.yaml"),
                           "--model.encoder_weights", "artifacts/absent/encoder.pt", "--run_dir", str(tmp_path / "runs")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rsgm:")]
    assert len(errors) == 1 and str(ROOT / "artifacts" / "absent" / "encoder.pt") in errors[0], proc.stderr
    assert "b4b_victim_digits.yaml" in errors[0]
    assert "Traceback" not in proc.stderr and "Union" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_help_lists_every_subcommand_with_one_line():
    text = usage()
    assert "Lightning Trainer command line tool" not in text
    for name in [*LIGHTNING_COMMANDS, *EXTRA_COMMANDS]:
        (line,) = [x for x in text.splitlines() if x.strip().startswith(name + " ")]
        assert len(line.split(None, 1)[1]) > 10
