import os

import pytest
import torch

# Tests must never reach the network or a W&B account.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _fresh_run_dir_env(monkeypatch):
    """Each CLI run inside a test gets its own run folder (the CLI records it in the env)."""
    monkeypatch.delenv("RSGM_RUN_DIR", raising=False)
