"""Parity through the command line: ``rsgm test`` on 2 CPU processes (plain ``ddp``) gives
the same evaluation numbers as on 1 process. Slow (several CLI runs); ``pytest -m slow``.

* ZDC: per-channel and per-quartile W1 of an SDI-GAN checkpoint (quickstart.yaml);
* CDI on the built-in digits target (a tiny DDPM trained here): per-feature MIA TPR@FPR and
  AUC, and the dataset-inference p-values, null experiment and contamination table.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DDP2 = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


def rsgm(args: list[str], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RSGM_RUN_DIR"} | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "rsgm.cli", *args, "--run_dir", str(tmp_path / "runs")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "sync_dist=True" not in done.stderr, "epoch metrics must be synchronised under DDP"


def one(tmp_path: Path, pattern: str) -> Path:
    (found,) = (tmp_path / "runs").glob(pattern)
    return found


def assert_same_numbers(a, b, path="") -> None:
    """Equal structure; numbers equal to 1e-6 relative (float32 reductions in another order)."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), path
        for k in a:
            assert_same_numbers(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_numbers(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b)), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.slow
def test_zdc_channel_w1_two_processes_equal_one(tmp_path):
    config = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--data.n_synthetic", "600",
              "--data.eval_batch_size", "32", "--logger", "none"]
    rsgm(["fit", *config, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
          "--trainer.limit_val_batches", "1", "--run_name", "fit"], tmp_path)
    ckpt = one(tmp_path, "fit/fit-*/checkpoints/last.ckpt")
    rsgm(["test", *config, "--ckpt_path", str(ckpt), "--run_name", "p1"], tmp_path)
    rsgm(["test", *config, "--ckpt_path", str(ckpt), "--run_name", "p2", *DDP2], tmp_path)
    w1 = [json.loads(one(tmp_path, f"{p}/test-*/test_channel_w1.json").read_text()) for p in ("p1", "p2")]
    assert w1[0]["test/w1_mean"] > 0 and len([k for k in w1[0] if k.startswith("test/w1_")]) >= 10
    assert_same_numbers(w1[0], w1[1])


@pytest.mark.slow
def test_cdi_digits_mia_and_di_two_processes_equal_one(tmp_path):
    dm = tmp_path / "dm"
    rsgm(["fit", "--config", str(ROOT / "configs" / "dm_digits.yaml"), "--model.block_out_channels", "[8, 16]",
          "--trainer.max_epochs", "3", "--model.export_dir", str(dm), "--logger", "none", "--run_name", "dm"], tmp_path)
    text = (ROOT / "configs" / "cdi_digits.yaml").read_text().replace("models/dm_digits", str(dm))
    for old, new in [('[dl, secmi, pia, pian, gm, ml, "no"]', "[dl, pia, gm]"), ("trials: 1000", "trials: 100"),
                     ("[0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]", "[0.0, 0.5, 1.0]"), ("contamination_trials: 200", "contamination_trials: 20")]:
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "cdi.yaml").write_text(text)
    config = ["--config", str(tmp_path / "cdi.yaml"), "--logger", "none"]
    rsgm(["test", *config, "--run_name", "c1"], tmp_path)
    rsgm(["test", *config, "--run_name", "c2", *DDP2], tmp_path)
    mia = [one(tmp_path, f"{p}/test-*/mia/metrics.csv").read_text() for p in ("c1", "c2")]
    assert len(mia[0].splitlines()) >= 4
    assert mia[0] == mia[1]
    summaries = [json.loads(one(tmp_path, f"{p}/test-*/cdi/summary.json").read_text()) for p in ("c1", "c2")]
    assert_same_numbers(summaries[0], summaries[1])
    curves = [one(tmp_path, f"{p}/test-*/cdi/pvalue_curve.csv").read_text() for p in ("c1", "c2")]
    assert curves[0] == curves[1] and len(curves[0].splitlines()) > 2
