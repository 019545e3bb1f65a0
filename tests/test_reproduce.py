"""The per-chapter reproduction driver: listing, dispatch, and the shared table printer."""

import argparse
import importlib.util
import sys
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_list_names_every_chapter(capsys):
    reproduce = _load("reproduce")
    assert reproduce.main(["--list"]) == 0
    out = capsys.readouterr().out
    for chapter in (4, 5, 6, 7, 8, 9):
        assert f"chapter {chapter}:" in out


def test_dispatch_passes_arguments_after_double_dash(tmp_path, monkeypatch):
    reproduce = _load("reproduce")
    (tmp_path / "reproduce_ch4.py").write_text("def main(argv):\n    return 3 if argv == [\"--seeds\", \"0\", \"1\"] else 9\n")
    monkeypatch.setattr(reproduce, "HERE", tmp_path)
    assert reproduce.main(["--chapter", "4", "--", "--seeds", "0", "1"]) == 3
    with pytest.raises(SystemExit, match="chapter 5 has no script yet"):
        reproduce.main(["--chapter", "5"])


def test_mean_std_matches_numpy_and_table_is_markdown(capsys):
    common = _load("reproduce_common")
    values = [1.0, 2.5, 4.0]
    assert common.mean_std(values, digits=3) == f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"
    assert common.mean_std([7.25], digits=1) == "7.2"
    assert common.mean_std([]) == "n/a"
    text = common.print_table("T", ["a", "b"], [[1, "x"]], note="n")
    assert text.splitlines()[2:5] == ["| a | b |", "|---|---|", "| 1 | x |"]
    assert "### T" in capsys.readouterr().out


def test_expertsim_table_budget_arguments():
    table = _load("expertsim_table")
    steps = argparse.Namespace(max_steps=75, budget_s=45)
    seconds = argparse.Namespace(max_steps=0, budget_s=45)
    assert table.budget_args(steps) == ["--trainer.callbacks+=expertsim_table.BatchBudget", "--trainer.callbacks.batches=75"]
    assert table.budget_args(seconds) == ["--trainer.max_epochs", "10000", "--trainer.max_time", "00:00:00:45"]
    assert "75 training batches" in table.budget_text(steps) and "45 s" in table.budget_text(seconds)


class _TwoOptimizerGAN(lightning.LightningModule):
    """Manual optimisation with two optimizers stepped once per batch, as the ZDC GANs do."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        self.max_epochs_seen = None

    def training_step(self, batch, batch_idx):
        self.max_epochs_seen = self.trainer.max_epochs
        for opt, layer in zip(self.optimizers(), (self.a, self.b)):
            opt.zero_grad()
            self.manual_backward(layer(batch[0]).pow(2).mean())
            opt.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)]

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 2)), batch_size=4)  # 4 batches


def test_batch_budget_counts_batches_not_optimizer_steps():
    table = _load("expertsim_table")
    module = _TwoOptimizerGAN()
    trainer = lightning.Trainer(max_epochs=10000, callbacks=[table.BatchBudget(6)], logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module)
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 6  # batches (generator updates)
    assert trainer.global_step == 12  # Lightning's max_steps counts both optimizers' steps
    assert module.max_epochs_seen == 2  # 6 batches of 4 per epoch span 2 epochs (the temperature schedule's length)


def test_ch4_hep_only_needs_a_budget():
    ch4 = _load("reproduce_ch4")
    with pytest.raises(SystemExit):
        ch4.main(["--hep-only"])
