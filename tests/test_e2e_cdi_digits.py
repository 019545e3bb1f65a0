"""End to end through the CLI on the built-in target, exactly as a user runs it:

    rsgm fit  --config configs/dm_digits.yaml
    rsgm test --config configs/cdi_digits.yaml

CDI must find the members (p < 0.01 at the reported min |P|) and the null experiment must
keep its false-positive rate at alpha = 0.01 within 2 % over 1000 trials. Slow (about ten
minutes on two CPU cores); run with ``pytest -m slow``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def rsgm(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RSGM_RUN_DIR"} | {"OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "rsgm.cli", *args, "--logger", "csv", "--run_dir", str(tmp_path / "runs")],
                   cwd=ROOT, env=env, check=True)


@pytest.mark.slow
def test_cli_fit_then_cdi(tmp_path):
    model_dir = tmp_path / "dm_digits"
    for name in ("dm_digits", "cdi_digits"):
        text = (ROOT / "configs" / f"{name}.yaml").read_text().replace("models/dm_digits", str(model_dir))
        (tmp_path / f"{name}.yaml").write_text(text)
    rsgm(["fit", "--config", str(tmp_path / "dm_digits.yaml")], tmp_path)
    assert (model_dir / "membership.json").is_file()
    rsgm(["test", "--config", str(tmp_path / "cdi_digits.yaml")], tmp_path)
    (summary_path,) = (tmp_path / "runs" / "cdi_digits").glob("test-*/cdi/summary.json")
    summary = json.loads(summary_path.read_text())
    curve = (summary_path.parent / "pvalue_curve.csv").read_text().splitlines()
    n = summary["min_P_all"]
    assert n is not None and n <= 300
    assert any(line.startswith(f"all,{n},") and float(line.split(",")[3]) < 0.01 for line in curve)
    assert summary["null_trials"] == 1000 and summary["null_false_positive_rate"] <= 0.02
    assert 0.3 < summary["null_mean_p"] < 0.6
