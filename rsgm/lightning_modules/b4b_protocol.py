"""Table 6.4.1 of B4B on a testbed, as a LightningModule that only computes results.

``B4BProtocol`` answers every account of the protocol through several defences at once (one
encoder forward per batch), then steals and probes.  The results (``self.results``: table rows,
remapping fidelity, coverage traces) are logged as metrics; ``rsgm.callbacks.b4b_report``
prints and writes the tables and figures.
"""
from __future__ import annotations

import copy
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from rsgm.defenses.b4b import B4BDefense
from rsgm.defenses.config import PRESETS, DefenseConfig
from rsgm.defenses.stealing import cat_images, embed, linear_probe_accuracy, remap_sybils, train_surrogate
from rsgm.lightning_modules.b4b_victim import _load_frozen, _user_groups


class B4BProtocol(LightningModule):
    """Table 6.4.1 on a testbed: every account answered under each defence, then steal and probe.

    Args:
        encoder, encoder_weights: the victim (class_path in the config, local state dict).
        defenses: name -> overrides of the defence block (``DefenseConfig`` fields: ``noise``, ``lam``,
            ``alpha``, ``beta``, ``static_sigma``, ``transform``, ...).  ``none`` is the undefended reference.
        defense: the base defence block every entry of ``defenses`` starts from.
        secret: server secret for the per-user transforms (a fixed string keeps the run reproducible).
        attack_rows: which ``"<defense>/<scenario>"`` pairs to steal (None: every pair).
        surrogate: architecture of the stolen encoder (its output size is set to the answer size).
        loss, tau, epochs, lr, steal_batch_size: the stealing attack.
        remap_grid: numbers of overlapping queries for the remapping-fidelity curve (Fig. 6.4.3).
        remap_holdout: shared queries kept out of the remap fit to measure its fidelity.
    """

    # `rsgm test` needs no checkpoint: the victim comes from encoder_weights and the
    # surrogates are trained during the test run.
    needs_checkpoint = False

    def __init__(self, encoder: nn.Module, encoder_weights: str | None = None, defenses: dict[str, dict] | None = None,
                 defense: dict | None = None,
                 secret: str = "rsgm-testbed-secret", attack_rows: list[str] | None = None, surrogate: nn.Module | None = None,
                 loss: str = "infonce", tau: float = 0.25, epochs: int = 8, lr: float = 2e-3, steal_batch_size: int = 256,
                 n_proj: int = 20, n_bits: int = 12, remap_grid: list[int] = (16, 32, 64, 128, 300),
                 remap_holdout: int = 200, seed: int = 0):
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "surrogate"])
        self.encoder = _load_frozen(encoder, encoder_weights)
        if surrogate is None:
            raise ValueError("B4BProtocol needs a surrogate architecture (model.surrogate with a class_path)")
        self.surrogate_template = surrogate
        self.defense_kwargs = dict(defenses or {"none": PRESETS["none"]})
        base = dict(defense or {}) | {"n_proj": n_proj, "n_bits": n_bits}
        self.defense_configs = {name: DefenseConfig.from_dict(base | dict(kw)) for name, kw in self.defense_kwargs.items()}
        self.results: dict | None = None
        self.defenses: dict[str, B4BDefense] = {}
        # (defense, user) -> list of answer batches, and per-batch (queries, coverage, sigma) traces
        self.answers: dict[tuple[str, str], list[torch.Tensor]] = defaultdict(list)
        self.traces: dict[tuple[str, str], list[tuple[int, float, float]]] = defaultdict(list)

    def on_test_start(self) -> None:
        root = Path(self.trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        self._state_dir = Path(tempfile.mkdtemp(prefix="b4b_state_", dir=root))

    def _defense(self, name: str, dim: int) -> B4BDefense:
        if name not in self.defenses:
            self.defenses[name] = B4BDefense(dim, self._state_dir / f"{name}.sqlite", self.hparams.secret.encode(),
                                             self.defense_configs[name])
        return self.defenses[name]

    @torch.no_grad()
    def test_step(self, batch, batch_idx):
        r_all = self.encoder(batch["x"]).float().cpu()
        for user, idx in _user_groups(batch["user_id"]).items():  # one user per batch, except under fast_dev_run
            r = r_all if idx is None else r_all[idx]
            for name in self.defense_kwargs:
                resp = self._defense(name, r.shape[1]).respond(user, r)
                self.answers[(name, user)].append(resp.representation)
                self.traces[(name, user)].append((resp.n_queries, resp.coverage, resp.sigma))

    def _answers(self, name: str, user: str) -> torch.Tensor:
        return torch.cat(self.answers[(name, user)]).clone()

    def _steal(self, x: torch.Tensor, targets: torch.Tensor, desc: str) -> nn.Module:
        torch.manual_seed(self.hparams.seed)
        surrogate = _with_output_dim(copy.deepcopy(self.surrogate_template), targets.shape[1])
        hp = self.hparams
        epochs = 1 if self.trainer.fast_dev_run else hp.epochs
        return train_surrogate(surrogate, x, targets, hp.loss, epochs, hp.steal_batch_size, hp.lr, hp.tau, hp.seed, desc,
                               device=self.device)

    def _probe(self, features_of, tasks) -> dict[str, float]:
        return {t: linear_probe_accuracy(features_of(task.x_train, t, "train"), task.y_train,
                                         features_of(task.x_test, t, "test"), task.y_test) for t, task in tasks.items()}

    def on_test_epoch_end(self) -> None:
        # the test loop runs under inference mode; stealing needs autograd
        with torch.inference_mode(False), torch.enable_grad():
            self._evaluate()

    def _evaluate(self) -> None:
        dm = self.trainer.datamodule
        tasks, accounts = dm.tasks, dm.accounts
        rows, fidelity = [], []
        for name in self.defense_kwargs:
            # legit user of task t probes its own answers (train half first: task.x_all = [train, test])
            legit = {}
            for t, task in tasks.items():
                a = self._answers(name, f"legit-{t}")
                legit[t] = linear_probe_accuracy(a[:len(task.x_train)], task.y_train, a[len(task.x_train):], task.y_test)
            cov = max(self.traces[(name, f"legit-{t}")][-1][1] for t in tasks)
            rows.append(dict(user="Legit", defense=name, queries="ALL", coverage=cov, **legit))
        scenarios: dict[str, list] = defaultdict(list)
        for a in accounts:
            if a.kind != "legit":
                scenarios[a.scenario].append(a)
        wanted = self.hparams.attack_rows
        for name in self.defense_kwargs:
            for scen, accs in scenarios.items():
                if wanted is not None and f"{name}/{scen}" not in wanted:
                    continue
                x, y, fid = self._pool_accounts(name, accs)
                fidelity += [dict(defense=name, scenario=scen, **f) for f in fid]
                model = self._steal(x, y, f"steal {name}/{scen}")
                acc = self._probe(lambda xs, t, split: embed(model, xs), tasks)
                cov = max(self.traces[(name, a.user_id)][-1][1] for a in accs)
                kind = "Sybil" if accs[0].kind == "sybil" else "Attack"
                q = f"{len(accs)}x{len(accs[0].images)}" if kind == "Sybil" else str(len(accs[0].images))
                rows.append(dict(user=kind, defense=name, queries=q, coverage=cov, **acc))
                rank_zero_info(f"{kind} {name} {q}: " + ", ".join(f"{t} {v:.1f}" for t, v in acc.items()))
        self._finish(rows, fidelity, list(tasks))

    def _pool_accounts(self, name: str, accs: list) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """Queries and answers of one attack; sybils are remapped into account 0's space."""
        if len(accs) == 1:
            return accs[0].images, self._answers(name, accs[0].user_id), []
        ov = accs[0].overlap
        holdout = min(self.hparams.remap_holdout, ov // 2)  # equal unless fast_dev_run shrank the overlap
        ys, fid = remap_sybils([self._answers(name, a.user_id) for a in accs], ov, holdout,
                               self.hparams.remap_grid, [a.user_id for a in accs])
        return cat_images([accs[0].images] + [a.images[ov:] for a in accs[1:]]), ys, fid

    def _finish(self, rows: list[dict], fidelity: list[dict], task_names: list[str]) -> None:
        """Log every table cell and final account state; keep the results for the report callback."""
        for r in rows:
            prefix = f"table/{r['user']}/{r['defense']}/{r['queries']}"
            self.log_dict({f"{prefix}/{t}": r[t] for t in task_names} | {f"{prefix}/coverage": r["coverage"]}, rank_zero_only=True)
        for (name, user), tr in self.traces.items():
            self.log_dict({f"b4b/{name}/{user}/coverage": tr[-1][1], f"b4b/{name}/{user}/sigma": tr[-1][2],
                           f"b4b/{name}/{user}/queries": float(tr[-1][0])}, rank_zero_only=True)
        ref = self._reference_defense()
        self.results = dict(rows=rows, fidelity=fidelity, tasks=task_names, reference=ref,
                            traces={u: tr for (n, u), tr in self.traces.items() if n == ref},
                            coverage_at=self._coverage_at_equal_counts(),
                            reference_config=self.defense_configs[ref],
                            kinds={a.user_id: a.kind for a in self.trainer.datamodule.accounts})

    def _reference_defense(self) -> str:
        """The first coverage-based defence (plots and coverage tables use it)."""
        return next((n for n, c in self.defense_configs.items() if c.noise == "coverage"), next(iter(self.defense_configs)))

    def _coverage_at_equal_counts(self):
        """Coverage of every account after n queries, n = each legit user's full query count."""
        import pandas as pd

        ref = self._reference_defense()
        traces = {u: tr for (n, u), tr in self.traces.items() if n == ref}
        counts = sorted({tr[-1][0] for u, tr in traces.items() if u.startswith("legit-")})
        rows = []
        for user, tr in traces.items():
            row = {"account": user}
            for n in counts:
                done = [c for q, c, _ in tr if q <= n]
                row[f"after {n}"] = done[-1] if done and tr[-1][0] >= n else float("nan")
            rows.append(row)
        return pd.DataFrame(rows)


def _with_output_dim(model: nn.Module, dim: int) -> nn.Module:
    """Resize the surrogate's last linear layer so its output matches the API answers."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError(f"surrogate {type(model).__name__} has no final nn.Linear whose output size could be set to {dim}")
    lin = last[-1]
    if lin.out_features != dim:
        new = nn.Linear(lin.in_features, dim)
        for parent in model.modules():
            for cname, child in parent.named_children():
                if child is lin:
                    setattr(parent, cname, new)
    return model
