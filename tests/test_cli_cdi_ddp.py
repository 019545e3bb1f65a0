"""CDI through the CLI across processes, as a user runs it (slow: trains a small target first).

    rsgm test --config configs/cdi_digits.yaml --trainer.strategy ddp --trainer.devices 2 --trainer.accelerator cpu

must give the same features, scores and p-values as one process, and a second run that
finds the features cache must not touch the model (here: its folder is deleted first).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rsgm.lightning_modules.diffusion_attack import load_features_cache
from rsgm.privacy.safe_files import load_tensors

ROOT = Path(__file__).resolve().parents[1]
SMALL = """
model:
  init_args:
    feature_options: {{pia_p: 2.0, max_batch: 2048, gm_timesteps: [100, 600], ml_timesteps: [100, 600], secmi_t: 20, dl_draws: 2, no_steps: 2}}
    features_cache: {cache}
data:
  init_args:
    n_suspect: 60
    n_reference: 120
trainer:
  callbacks:
    - class_path: rsgm.callbacks.membership.MembershipMetrics
    - class_path: rsgm.callbacks.dataset_inference.DatasetInference
      init_args: {{trials: 50, null_trials: 100, sizes: [10, 20], contamination_ratios: [0.0, 1.0], contamination_trials: 20, ablation: false}}
"""


def rsgm(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RSGM_RUN_DIR"} | {"OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "rsgm.cli", *args, "--logger", "csv", "--run_dir", str(tmp_path / "runs")],
                   cwd=ROOT, env=env, check=True, timeout=3000)


def _run_folder(tmp_path, before):
    new = sorted(set((tmp_path / "runs").rglob("summary.json")) - before)
    assert len(new) == 1, new
    return new[0].parent.parent


@pytest.mark.slow
def test_cdi_cli_two_processes_match_one_and_cache_skips_the_model(tmp_path):
    model_dir = tmp_path / "dm_digits"
    fit = (ROOT / "configs" / "dm_digits.yaml").read_text().replace("models/dm_digits", str(model_dir)).replace("max_epochs: 400", "max_epochs: 3")
    (tmp_path / "dm.yaml").write_text(fit)
    rsgm(["fit", "--config", str(tmp_path / "dm.yaml")], tmp_path)
    (tmp_path / "cdi.yaml").write_text((ROOT / "configs" / "cdi_digits.yaml").read_text().replace("models/dm_digits", str(model_dir)))
    folders = {}
    for name, extra in (("one", []), ("two", ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"])):
        (tmp_path / f"{name}.yaml").write_text(SMALL.format(cache=tmp_path / f"{name}_cache.safetensors"))
        before = set((tmp_path / "runs").rglob("summary.json"))
        rsgm(["test", "--config", str(tmp_path / "cdi.yaml"), "--config", str(tmp_path / f"{name}.yaml"), *extra], tmp_path)
        folders[name] = _run_folder(tmp_path, before)
    one, two = (load_features_cache(folders[n] / "features.safetensors") for n in ("one", "two"))
    assert one["names"] == two["names"] and len(one["index"]) == 180
    for key in ("index", "is_member", "in_suspect"):
        assert torch.equal(one[key], two[key])
    torch.testing.assert_close(two["features"], one["features"], rtol=1e-5, atol=1e-6)
    s1, s2 = (load_tensors(folders[n] / "mia" / "scores.safetensors", "rsgm.mia_scores")[0] for n in ("one", "two"))
    for key in s1:
        torch.testing.assert_close(s2[key], s1[key], rtol=1e-5, atol=1e-6)
    j1, j2 = (json.loads((folders[n] / "cdi" / "summary.json").read_text()) for n in ("one", "two"))
    for key in ("audit_p_value", "null_false_positive_rate", "null_mean_p"):
        assert abs(j1[key] - j2[key]) <= 1e-6 * max(1.0, abs(j1[key])), key
    # Second run of the same command: the cache exists, the model's weights are gone (only the
    # membership split the datamodule reads stays), same result.
    shutil.rmtree(model_dir / "unet")
    shutil.rmtree(model_dir / "scheduler")
    before = set((tmp_path / "runs").rglob("summary.json"))
    rsgm(["test", "--config", str(tmp_path / "cdi.yaml"), "--config", str(tmp_path / "one.yaml")], tmp_path)
    j3 = json.loads((_run_folder(tmp_path, before) / "cdi" / "summary.json").read_text())
    assert j3["audit_p_value"] == j1["audit_p_value"]
