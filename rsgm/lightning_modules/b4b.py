"""B4B as LightningModules: the testbed victim, the defended encoder, the Table 6.4.1 protocol
and the stealing attack.

* ``VictimEncoderModule`` trains the testbed victim (supervised, see docs/b4b.md) and exports
  the encoder's state dict to ``export_path``.
* ``B4BEncoder`` wraps any encoder with the B4B defence; ``predict`` / ``test`` batches carry
  ``user_id`` and only defended representations leave the module.
* ``B4BProtocol`` answers every account of the protocol through several defences at once (one
  encoder forward per batch), then steals, probes and prints the Table 6.4.1-shaped table.
* ``StealingModule`` is one stealing attack (optionally with sybils) trained by ``rsgm fit``.
"""
from __future__ import annotations

import copy
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import TensorDataset

from rsgm.components.encoders import load_encoder_weights
from rsgm.defenses.b4b import B4BDefense, load_or_create_secret
from rsgm.defenses.cost import b4b_sigma
from rsgm.defenses.stealing import (apply_remap, cat_images, embed, fit_linear_remap, linear_probe_accuracy,
                                    mean_cosine_distance, surrogate_loss, train_surrogate)


class VictimEncoderModule(LightningModule):
    """Supervised training of an encoder with a linear head over the broad corpus' labels.

    Small Gaussian input noise regularises; the head sees the signed representation, so the
    representation itself spreads over all orthants (what the LSH coverage needs).
    """

    def __init__(self, encoder: nn.Module, n_classes: int = 24, lr: float = 2e-3, weight_decay: float = 1e-4,
                 input_noise: float = 0.03, export_path: str | None = "artifacts/b4b_victim_digits/encoder.pt"):
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"])
        self.encoder = encoder
        self.head = nn.Linear(encoder.rep_dim, n_classes)

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x + self.hparams.input_noise * torch.randn_like(x)
        loss = F.cross_entropy(self.head(self.encoder(x)), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.head(self.encoder(x))
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", (logits.argmax(1) == y).float().mean() * 100, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def on_fit_end(self) -> None:
        if self.hparams.export_path and self.trainer.is_global_zero:
            path = Path(self.hparams.export_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.encoder.state_dict(), path)
            rank_zero_info(f"victim encoder state dict written to {path}")


def _load_frozen(encoder: nn.Module, weights: str | None) -> nn.Module:
    if weights is None:
        raise ValueError("encoder_weights is not set: a served encoder needs trained weights (path to a state dict)")
    if not Path(weights).is_file():
        raise FileNotFoundError(f"encoder weights {weights} not found; for the testbed run `rsgm fit --config configs/b4b_victim_digits.yaml` first, "
                                "otherwise put the state dict there or fix encoder_weights")
    load_encoder_weights(encoder, weights)
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


def _user_groups(user_ids) -> dict[str, list[int] | None]:
    """Sample positions per user, in order of first appearance (None: the whole batch)."""
    if isinstance(user_ids, str):
        return {user_ids: None}
    groups: dict[str, list[int]] = defaultdict(list)
    for i, u in enumerate(user_ids):
        groups[str(u)].append(i)
    return groups


class B4BEncoder(LightningModule):
    """An encoder served through the B4B defence.

    Batches are ``{"x": images, "user_id": str or list[str]}``.  ``predict_step`` returns
    ``{"representation", "user_id"}`` with defended representations; the clean ones never leave.
    State (coverage, query counts) persists in ``state_path``; transforms derive from the secret
    in ``secret_file`` (created on first use).
    """

    def __init__(self, encoder: nn.Module, encoder_weights: str | None = None, state_path: str = "b4b_state.sqlite",
                 secret_file: str = "b4b_secret.bin", noise: str = "coverage", lam: float = 1e-6, alpha: float = 1.0,
                 beta: float = 0.8, static_sigma: float = 0.0, transform: str = "affine", n_proj: int = 20,
                 n_bits: int = 12, lsh_seed: int = 0, noise_seed: int | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"])
        self.encoder = _load_frozen(encoder, encoder_weights)
        self.defense: B4BDefense | None = None

    def _defense(self, dim: int) -> B4BDefense:
        if self.defense is None:
            hp = self.hparams
            self.defense = B4BDefense(dim, hp.state_path, load_or_create_secret(hp.secret_file), noise=hp.noise, lam=hp.lam,
                                      alpha=hp.alpha, beta=hp.beta, static_sigma=hp.static_sigma, transform=hp.transform,
                                      n_proj=hp.n_proj, n_bits=hp.n_bits, lsh_seed=hp.lsh_seed, noise_seed=hp.noise_seed)
        return self.defense

    @torch.no_grad()
    def defended(self, x: torch.Tensor, user_ids) -> tuple[torch.Tensor, dict]:
        """Defended answers for a batch that may mix users; also per-user (coverage, sigma, queries)."""
        r = self.encoder(x).float()
        defense = self._defense(r.shape[1])
        out = torch.empty(len(r), defense.out_dim, dtype=r.dtype, device=r.device)
        info = {}
        for user, idx in _user_groups(user_ids).items():
            if idx is None:
                idx = list(range(len(r)))
            resp = defense.respond(user, r[idx])
            out[idx] = resp.representation
            info[user] = resp
        return out, info

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        out, _ = self.defended(batch["x"], batch["user_id"])
        return {"representation": out, "user_id": batch["user_id"]}

    def test_step(self, batch, batch_idx):
        _, info = self.defended(batch["x"], batch["user_id"])
        for user, resp in info.items():
            self.log_dict({f"b4b/{user}/coverage": resp.coverage, f"b4b/{user}/sigma": resp.sigma,
                           f"b4b/{user}/queries": float(resp.n_queries)}, on_step=False, on_epoch=True, reduce_fx="max")


class B4BProtocol(LightningModule):
    """Table 6.4.1 on a testbed: every account answered under each defence, then steal and probe.

    Args:
        encoder, encoder_weights: the victim (class_path in the config, local state dict).
        defenses: name -> ``B4BDefense`` keyword arguments (``noise``, ``lam``, ``alpha``, ``beta``,
            ``static_sigma``, ``transform``, ...).  The name ``none`` is the undefended reference.
        secret: server secret for the per-user transforms (a fixed string keeps the run reproducible).
        attack_rows: which ``"<defense>/<scenario>"`` pairs to steal (None: every pair).
        surrogate: architecture of the stolen encoder (its output size is set to the answer size).
        loss, tau, epochs, lr, steal_batch_size: the stealing attack.
        remap_grid: numbers of overlapping queries for the remapping-fidelity curve (Fig. 6.4.3).
        remap_holdout: shared queries kept out of the remap fit to measure its fidelity.
    """

    def __init__(self, encoder: nn.Module, encoder_weights: str | None = None, defenses: dict[str, dict] | None = None,
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
        self.defense_kwargs = dict(defenses or {"none": {"noise": "static", "transform": "none"}})
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
            kw = dict(self.defense_kwargs[name])
            kw.setdefault("n_proj", self.hparams.n_proj)
            kw.setdefault("n_bits", self.hparams.n_bits)
            self.defenses[name] = B4BDefense(dim, self._state_dir / f"{name}.sqlite", self.hparams.secret.encode(), **kw)
        return self.defenses[name]

    @torch.no_grad()
    def test_step(self, batch, batch_idx):
        user = batch["user_id"]
        r = self.encoder(batch["x"]).float().cpu()
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
        return train_surrogate(surrogate, x, targets, hp.loss, hp.epochs, hp.steal_batch_size, hp.lr, hp.tau, hp.seed, desc,
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
        self._report(rows, fidelity, list(tasks))

    def _pool_accounts(self, name: str, accs: list) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """Queries and answers of one attack; sybils are remapped into account 0's space."""
        if len(accs) == 1:
            return accs[0].images, self._answers(name, accs[0].user_id), []
        ov, hold = accs[0].overlap, self.hparams.remap_holdout
        if ov <= hold:
            raise ValueError(f"sybil overlap {ov} must exceed remap_holdout {hold}")
        ref = self._answers(name, accs[0].user_id)
        xs, ys, fid = [accs[0].images], [ref], []
        for a in accs[1:]:
            ans = self._answers(name, a.user_id)
            # fidelity curve: fit on the first n shared queries, test on the last `hold` shared ones
            for n in [n for n in self.hparams.remap_grid if n <= ov - hold]:
                w = fit_linear_remap(ans[:n], ref[:n])
                fid.append(dict(account=a.user_id, n_overlap=n,
                                cosine_distance=mean_cosine_distance(apply_remap(w, ans[ov - hold:ov]), ref[ov - hold:ov])))
            w = fit_linear_remap(ans[:ov], ref[:ov])
            xs.append(a.images[ov:])
            ys.append(apply_remap(w, ans[ov:]))
        return cat_images(xs), torch.cat(ys), fid

    def _report(self, rows: list[dict], fidelity: list[dict], task_names: list[str]) -> None:
        import pandas as pd

        table = pd.DataFrame(rows)
        table["mean"] = table[task_names].mean(axis=1)
        coverage_at = self._coverage_at_equal_counts()
        for r in rows:
            prefix = f"table/{r['user']}/{r['defense']}/{r['queries']}"
            self.log_dict({f"{prefix}/{t}": r[t] for t in task_names} | {f"{prefix}/coverage": r["coverage"]}, rank_zero_only=True)
        for (name, user), tr in self.traces.items():
            self.log_dict({f"b4b/{name}/{user}/coverage": tr[-1][1], f"b4b/{name}/{user}/sigma": tr[-1][2],
                           f"b4b/{name}/{user}/queries": float(tr[-1][0])}, rank_zero_only=True)
        if not self.trainer.is_global_zero:
            return
        text = table.to_string(index=False, float_format=lambda v: f"{v:.3f}" if v < 1 else f"{v:.1f}")
        print("\nB4B protocol (Table 6.4.1 shape): linear-probe accuracy (%) per downstream task\n" + text + "\n")
        print("Coverage after the same number of queries (defence '%s'):\n%s\n" % (self._reference_defense(), coverage_at.to_string(index=False, float_format=lambda v: f"{v:.4f}")))
        out = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        table.to_csv(out / "b4b_table.csv", index=False)
        coverage_at.to_csv(out / "b4b_coverage_at_equal_queries.csv", index=False)
        (out / "b4b_table.txt").write_text(text + "\n")
        if fidelity:
            pd.DataFrame(fidelity).to_csv(out / "b4b_remap_fidelity.csv", index=False)
        self._plots(fidelity)

    def _reference_defense(self) -> str:
        """The first coverage-based defence (plots and coverage tables use it)."""
        return next((n for n, kw in self.defense_kwargs.items() if kw.get("noise", "coverage") == "coverage"), next(iter(self.defense_kwargs)))

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

    def _plots(self, fidelity: list[dict]) -> None:
        import matplotlib.pyplot as plt

        from rsgm.utils.figures import save_figure

        colors = {"legit": "tab:green", "attack": "tab:red", "sybil": "tab:orange"}
        kinds = {a.user_id: a.kind for a in self.trainer.datamodule.accounts}
        ref = self._reference_defense()
        fig, ax = plt.subplots(figsize=(6, 4))
        for (name, user), tr in self.traces.items():
            if name == ref:
                q, c, _ = zip(*tr)
                ax.plot(q, c, label=user, color=colors[kinds[user]], alpha=0.85, ls="-" if kinds[user] != "sybil" else "--")
        ax.set(xlabel="queries of the account", ylabel="coverage (fraction of occupied buckets)", title="Coverage vs queries (Fig. 6.4.1)")
        ax.legend(fontsize=7)
        save_figure(self.trainer, fig, "b4b_coverage_vs_queries")

        kw = self.defense_kwargs[ref]
        fig, ax = plt.subplots(figsize=(6, 4))
        all_cov = [c for (n, _), tr in self.traces.items() if n == ref for _, c, _ in tr]
        grid = torch.linspace(0, max(all_cov) * 1.2 + 1e-6, 200).tolist()
        if kw.get("noise", "coverage") == "coverage":
            lam, alpha, beta = kw.get("lam", 1e-6), kw.get("alpha", 1.0), kw.get("beta", 0.8)
            ax.plot(grid, [b4b_sigma(min(g, 1.0), lam, alpha, beta) for g in grid], color="black", lw=1, label="eq. 6.1")
        for (name, user), tr in self.traces.items():
            if name == ref:
                _, c, s = zip(*tr)
                ax.scatter(c, s, s=8, color=colors[kinds[user]], label=user)
        ax.set(xlabel="coverage", ylabel="sigma", yscale="symlog", title=f"sigma vs coverage, defence '{ref}' (Fig. 6.4.2)")
        ax.legend(fontsize=7)
        save_figure(self.trainer, fig, "b4b_sigma_vs_coverage")

        if fidelity:
            import pandas as pd

            df = pd.DataFrame(fidelity)
            fig, ax = plt.subplots(figsize=(6, 4))
            for (name, acc), g in df.groupby(["defense", "account"]):
                ax.plot(g["n_overlap"], g["cosine_distance"], marker="o", label=f"{name}: {acc}")
            ax.set(xscale="log", xlabel="overlapping queries", ylabel="mean cosine distance after remap", title="Remapping fidelity (Fig. 6.4.3)")
            ax.legend(fontsize=7)
            save_figure(self.trainer, fig, "b4b_remap_fidelity")


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


DEFENSE_PRESETS = ("none", "noise", "b4b")


class StealingModule(LightningModule):
    """Steal an encoder served (in-process) through a defence, with ``n_sybils`` accounts.

    ``setup("fit")`` sends the first ``queries`` images of the datamodule's broad pool through
    the API: one account, or ``n_sybils`` accounts that share the first ``overlap`` images and
    split the rest.  Sybil answers are remapped into account 0's space by least squares on the
    shared queries.  ``fit`` then trains the surrogate on (query, answer) pairs with InfoNCE,
    MSE or SoftNN on the (query, answer) pairs, which it hands to the datamodule's
    ``train_dataloader`` (``set_train_pairs``); ``LinearProbeCallback`` measures the stolen
    encoder on the downstream tasks.

    ``defense``: ``none`` (clean answers), ``noise`` (static ``static_sigma``, no transform) or
    ``b4b`` (eq. 6.1 with ``lam, alpha, beta`` and per-user ``transform``).
    """

    def __init__(self, victim: nn.Module, victim_weights: str | None, surrogate: nn.Module, defense: str = "b4b",
                 static_sigma: float = 0.1, lam: float = 1e-6, alpha: float = 10.0, beta: float = 0.036,
                 transform: str = "affine", queries: int = 16000, n_sybils: int = 1, overlap: int = 500,
                 loss: str = "infonce", tau: float = 0.25, lr: float = 2e-3, steal_batch_size: int = 256,
                 secret: str = "rsgm-testbed-secret",
                 n_proj: int = 20, n_bits: int = 12, query_batch: int = 250, remap_grid: list[int] = (16, 32, 64, 128, 300),
                 remap_holdout: int = 200, seed: int = 0):
        super().__init__()
        self.save_hyperparameters(ignore=["victim", "surrogate"])
        if defense not in DEFENSE_PRESETS:
            raise ValueError(f"defense must be one of {DEFENSE_PRESETS}, got {defense!r}")
        if n_sybils < 1:
            raise ValueError(f"n_sybils must be >= 1, got {n_sybils}")
        self.victim = _load_frozen(victim, victim_weights)
        self.surrogate = surrogate
        self.remap_fidelity: list[dict] = []
        self.account_stats: dict[str, tuple[int, float, float]] = {}
        self._data: TensorDataset | None = None

    def _make_defense(self, dim: int, state_dir: Path) -> B4BDefense:
        hp = self.hparams
        kw = {"none": dict(noise="static", static_sigma=0.0, transform="none"),
              "noise": dict(noise="static", static_sigma=hp.static_sigma, transform="none"),
              "b4b": dict(noise="coverage", lam=hp.lam, alpha=hp.alpha, beta=hp.beta, transform=hp.transform)}[hp.defense]
        return B4BDefense(dim, state_dir / "state.sqlite", hp.secret.encode(), n_proj=hp.n_proj, n_bits=hp.n_bits,
                          **kw)

    @torch.no_grad()
    def _query(self, defense: B4BDefense, user: str, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for i in range(0, len(x), self.hparams.query_batch):
            resp = defense.respond(user, self.victim(x[i:i + self.hparams.query_batch]).float())
            outs.append(resp.representation)
        self.account_stats[user] = (resp.n_queries, resp.coverage, resp.sigma)
        return torch.cat(outs)

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
        root = Path(self.trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        state_dir = Path(tempfile.mkdtemp(prefix="steal_state_", dir=root))
        with torch.no_grad():
            dim = self.victim(pool[:2]).shape[1]
        defense = self._make_defense(dim, state_dir)
        if hp.n_sybils == 1:
            x, y = pool[:hp.queries], self._query(defense, "attacker-0", pool[:hp.queries])
        else:
            shared = pool[:hp.overlap]
            xs, ys, ref = [], [], None
            for i in range(hp.n_sybils):
                start = hp.overlap + i * (per - hp.overlap)
                own = pool[start:start + per - hp.overlap]
                ans = self._query(defense, f"sybil-{i}", torch.cat([shared, own]))
                if ref is None:
                    ref = ans
                    xs.append(torch.cat([shared, own]))
                    ys.append(ans)
                    continue
                hold = hp.remap_holdout
                for n in [n for n in hp.remap_grid if n <= hp.overlap - hold]:
                    w = fit_linear_remap(ans[:n], ref[:n])
                    self.remap_fidelity.append(dict(account=f"sybil-{i}", n_overlap=n, cosine_distance=mean_cosine_distance(
                        apply_remap(w, ans[hp.overlap - hold:hp.overlap]), ref[hp.overlap - hold:hp.overlap])))
                w = fit_linear_remap(ans[:hp.overlap], ref[:hp.overlap])
                xs.append(own)
                ys.append(apply_remap(w, ans[hp.overlap:]))
            x, y = torch.cat(xs), torch.cat(ys)
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
