"""The Table 4.4.1 benchmark script and the 2-D generator's initial noise gain."""

import sys
from pathlib import Path

import pytest
import torch

from rsgm.components.gan import MLPGenerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_init_log_gain_sets_the_same_gain_for_every_condition():
    g = MLPGenerator(noise_dim=3, cond_dim=4, noise_gain=True, init_log_gain=-2.0)
    cond = torch.randn(5, 4)
    assert torch.allclose(g.log_gain(cond).exp(), torch.full((5, 3), float(torch.tensor(-2.0).exp())))
    assert MLPGenerator(noise_dim=3, cond_dim=4, noise_gain=True).log_gain(cond).std() > 0  # default: random init


@pytest.mark.slow
def test_table_script_runs_fit_and_test_for_each_row(tmp_path, capsys, monkeypatch):
    import synthetic2d_table

    monkeypatch.setattr(sys, "argv", ["synthetic2d_table.py", "--rows", "dcgan", "sdigan", "--seeds", "0", "1",
                                      "--epochs", "1", "--out", str(tmp_path), "--data.n_per_condition", "10"])
    synthetic2d_table.main()
    out = capsys.readouterr().out
    table = out[out.index("| model |"):]
    assert "| DC-GAN |" in table and "| SDI-GAN |" in table and "MS-GAN" not in table
    assert table.count("±") == 8  # 4 columns x 2 rows, mean ± std over the 2 seeds
    assert len(list(tmp_path.glob("*/test-*/test_synthetic2d.json"))) == 4


@pytest.mark.slow
def test_reproduce_ch4_prints_thesis_beside_rsgm_for_the_four_models(capsys):
    import reproduce_ch4

    reproduce_ch4.main(["--seeds", "0", "--epochs", "1", "--data.n_per_condition", "10"])
    out = capsys.readouterr().out
    table = out[out.index("### Table 4.4.1"):]
    for name, thesis in (("DC-GAN", "0.2 / "), ("MS-GAN", "115.5 / "), ("DivCo", "163.3 / "), ("SDI-GAN", "3.3 / ")):
        assert f"| {name} | {thesis}" in table
