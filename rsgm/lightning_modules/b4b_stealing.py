"""Encoder stealing as a LightningModule (``rsgm fit --config configs/steal_digits.yaml``)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import TensorDataset

from rsgm.defenses.api_client import EmbeddingClient
from rsgm.defenses.b4b import B4BDefense
from rsgm.defenses.config import PRESETS, DefenseConfig
from rsgm.defenses.stealing import remap_sybils, surrogate_loss
from rsgm.errors import RSGMError
from rsgm.lightning_modules.b4b_protocol import _with_output_dim
from rsgm.lightning_modules.b4b_victim import _load_frozen


class StealingModule(LightningModule):
    """Steal an encoder served through a defence, with ``n_sybils`` accounts.

    With ``endpoint`` (e.g. ``http://127.0.0.1:8080``) and ``api_keys`` (one per account) the
    queries go over HTTP to a running ``rsgm serve`` (batched, retried on 5xx/429, optionally
    rate-limited by ``min_interval_s``): the attack runs against the real deployment, and the
    victim weights are not needed.  Without ``endpoint`` the victim is served in-process
    through ``B4BDefense`` (``defense`` preset + the ``defense_config`` block).

    ``setup("fit")`` sends the first ``queries`` images of the datamodule's broad pool through
    the API: one account, or ``n_sybils`` accounts that share the first ``overlap`` images and
    split the rest.  Sybil answers are remapped into account 0's space by least squares on the
    shared queries.  ``fit`` then trains the surrogate on (query, answer) pairs with InfoNCE,
    MSE or SoftNN on the (query, answer) pairs, which it hands to the datamodule's
    ``train_dataloader`` (``set_train_pairs``); ``LinearProbeCallback`` measures the stolen
    encoder on the downstream tasks.

    ``defense``: ``none`` (clean answers), ``noise`` (static noise, no transform) or ``b4b``
    (eq. 6.1 and per-user transform); the parameters come from ``defense_config``.
    """

    def __init__(self, victim: nn.Module | None, victim_weights: str | None, surrogate: nn.Module, defense: str = "b4b",
                 defense_config: dict | None = None, queries: int = 16000, n_sybils: int = 1, overlap: int = 500,
                 loss: str = "infonce", tau: float = 0.25, lr: float = 2e-3, steal_batch_size: int = 256,
                 secret: str = "rsgm-testbed-secret", query_batch: int = 250, remap_grid: list[int] = (16, 32, 64, 128, 300),
                 remap_holdout: int = 200, seed: int = 0, endpoint: str | None = None, api_keys: list[str] | None = None,
                 retries: int = 5, min_interval_s: float = 0.0):
        super().__init__()
        self.save_hyperparameters(ignore=["victim", "surrogate"])
        if defense not in PRESETS:
            raise RSGMError(f"defense must be one of {tuple(PRESETS)}, got {defense!r}")
        if n_sybils < 1:
            raise RSGMError(f"n_sybils must be >= 1, got {n_sybils}")
        if endpoint is not None and len(api_keys or []) < n_sybils:
            raise RSGMError(f"stealing over HTTP with {n_sybils} account(s) needs as many api_keys, got {len(api_keys or [])}")
        self.defense_config = DefenseConfig.from_dict(defense_config).replace(**PRESETS[defense])
        self.victim = None if endpoint is not None else _load_frozen(victim, victim_weights)
        self.surrogate = surrogate
        self.remap_fidelity: list[dict] = []
        self.account_stats: dict[str, tuple[int, float, float]] = {}
        self._data: TensorDataset | None = None

    def _api(self, dim_probe: torch.Tensor):
        """account index -> function(images) -> answers, in-process or over HTTP."""
        hp = self.hparams
        if hp.endpoint is not None:
            clients = [EmbeddingClient(hp.endpoint, k, hp.query_batch, hp.retries, min_interval_s=hp.min_interval_s)
                       for k in hp.api_keys[:hp.n_sybils]]

            def over_http(i: int, x: torch.Tensor) -> torch.Tensor:
                out = clients[i].embed(x)
                self.account_stats[f"account-{i}"] = (clients[i].n_requests, float("nan"), float("nan"))
                return out
            return over_http
        root = Path(self.trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            dim = self.victim(dim_probe).shape[1]
        defense = B4BDefense(dim, Path(tempfile.mkdtemp(prefix="steal_state_", dir=root)) / "state.sqlite",
                             hp.secret.encode(), self.defense_config)

        @torch.no_grad()
        def in_process(i: int, x: torch.Tensor) -> torch.Tensor:
            outs = []
            for j in range(0, len(x), hp.query_batch):
                resp = defense.respond(f"account-{i}", self.victim(x[j:j + hp.query_batch]).float())
                outs.append(resp.representation)
            self.account_stats[f"account-{i}"] = (resp.n_queries, resp.coverage, resp.sigma)
            return torch.cat(outs)
        return in_process

    def setup(self, stage: str) -> None:
        if stage != "fit" or self._data is not None:
            return
        hp = self.hparams
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "pool"):
            raise ValueError("StealingModule needs a datamodule with a query pool and tasks, e.g. rsgm.datamodules.b4b_testbed.B4BTestbedDataModule")
        pool = dm.pool
        per = hp.queries // hp.n_sybils
        if hp.n_sybils > 1 and per <= hp.overlap + 1:
            raise ValueError(f"{hp.n_sybils} sybils with {per} queries each cannot share {hp.overlap}; lower overlap or n_sybils")
        need = hp.queries if hp.n_sybils == 1 else hp.overlap + hp.n_sybils * (per - hp.overlap)
        if need > len(pool):
            raise ValueError(f"the attack needs {need} distinct pool images but the pool has {len(pool)}; lower queries")
        query = self._api(pool[:2])
        if hp.n_sybils == 1:
            x, y = pool[:hp.queries], query(0, pool[:hp.queries])
        else:
            shared = pool[:hp.overlap]
            own = [pool[hp.overlap + i * (per - hp.overlap):hp.overlap + (i + 1) * (per - hp.overlap)] for i in range(hp.n_sybils)]
            answers = [query(i, torch.cat([shared, own[i]])) for i in range(hp.n_sybils)]
            y, self.remap_fidelity = remap_sybils(answers, hp.overlap, hp.remap_holdout, hp.remap_grid,
                                                  [f"account-{i}" for i in range(hp.n_sybils)])
            x = torch.cat([shared] + own)
        if not torch.isfinite(y).all():
            raise ValueError("the API answers contain inf/NaN; the defence's sigma overflowed for these settings")
        torch.manual_seed(hp.seed)
        self.surrogate = _with_output_dim(self.surrogate, y.shape[1])
        self._data = TensorDataset(x, y)
        if not hasattr(dm, "set_train_pairs"):
            raise ValueError(f"{type(dm).__name__} cannot serve stolen (query, answer) pairs; use B4BTestbedDataModule")
        dm.set_train_pairs(self._data, hp.steal_batch_size)
        for user, (q, c, s) in self.account_stats.items():
            rank_zero_info(f"{user}: {q} queries, coverage {c:.4f}, final sigma {s:.3g}")

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = surrogate_loss(self.hparams.loss, self.surrogate(x), y, self.hparams.tau)
        self.log("steal/loss", loss, prog_bar=True)
        return loss

    def on_train_start(self) -> None:
        for user, (q, c, s) in self.account_stats.items():
            self.log_dict({f"b4b/{user}/coverage": c, f"b4b/{user}/sigma": s, f"b4b/{user}/queries": float(q)})
        for f in self.remap_fidelity:
            self.log(f"remap/{f['account']}/cosine_distance@{f['n_overlap']}", f["cosine_distance"])

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.surrogate.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
