"""Two "nodes" x one process on this machine, launched the way a cluster launches them:
one ``torchrun`` per node (static rendezvous over localhost, a shared ``--rdzv-id``), with
``--trainer.num_nodes 2``. The run folder, the checkpoint, the config and the metrics are
written once, by global rank 0, into one folder named after the launcher's run id."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rsgm.utils.distributed import launcher_is_global_zero, launcher_run_id

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_launcher_run_id_and_rank_from_the_environment(monkeypatch):
    for var in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_NTASKS", "RANK", "SLURM_PROCID",
                "NODE_RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert launcher_run_id() is None and launcher_is_global_zero()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun without --rdzv-id
    assert launcher_run_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert launcher_run_id() is None  # an allocation running a single task: runs keep their timestamps
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_STEP_ID", "2")
    assert launcher_run_id() == "77.2"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job42")
    assert launcher_run_id() == "job42"
    monkeypatch.setenv("NODE_RANK", "1")
    assert not launcher_is_global_zero()
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert launcher_is_global_zero()
    monkeypatch.setenv("RANK", "3")
    assert not launcher_is_global_zero()


@pytest.mark.slow
def test_two_nodes_over_localhost_write_one_run_folder(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RSGM_RUN_DIR", "TORCHELASTIC_RUN_ID")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="offline")
    args = ["-m", "rsgm.cli", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
            "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.num_nodes", "2", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1",
            "--data.n_synthetic", "300", "--data.eval_batch_size", "64", "--logger", "csv",
            "--run_dir", str(tmp_path / "runs"), "--run_name", "twonodes"]
    nodes = [subprocess.Popen([str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1", f"--node-rank={rank}",
                               "--master-addr", "127.0.0.1", "--master-port", str(port), "--rdzv-id", "job42", *args],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    logs = [node.communicate(timeout=900)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    runs = [p for p in (tmp_path / "runs" / "twonodes").iterdir()]
    assert [p.name for p in runs] == ["fit-job42"]  # one folder, named after the shared run id
    run = runs[0]
    # the CLI keeps one checkpoint, last.ckpt, written once for both nodes
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]
    assert (run / "config.yaml").is_file()
    metrics = (run / "metrics.csv").read_text().splitlines()
    assert metrics.count(metrics[0]) == 1 and len(metrics) > 1  # one writer: a single header, then rows
    # Nothing else was written: no second run folder, no stray files in the working directory.
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["twonodes"]
    assert not [p for p in tmp_path.iterdir() if p.name not in ("runs",)]
