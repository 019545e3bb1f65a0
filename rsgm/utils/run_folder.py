"""Run folders: where relative config paths point, which folder a resumed run continues, and
the two run-long callbacks the ``rsgm`` command adds to every fit (time estimate, Ctrl-C).

Relative paths inside a config's ``model`` and ``data`` settings (weights, exports, data
folders, split files) resolve against one base, the *project folder*: the folder above
``configs/`` for a config kept in a ``configs/`` folder (the repository), otherwise the
config file's own folder. So ``rsgm test --config ~/rsgm/configs/cdi_digits.yaml`` finds
``models/dm_digits`` from any current directory.
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

# Config keys whose string values are file or folder paths (``images_file`` and
# ``conditions_file`` are names inside ``data.path`` and stay as they are).
PATH_KEYS = frozenset({"path", "root", "export_dir", "export_path", "encoder_weights", "victim_weights", "weights",
                       "split_file", "features_cache", "checkpoint", "state_path", "secret_file", "api_keys_file"})
# Keys naming where fit writes a model: an existing one is kept unless --overwrite true.
EXPORT_KEYS = frozenset({"export_dir", "export_path"})
WANDB_ID_FILE = "wandb_id"


def project_dir(config_files: list[Any]) -> Path:
    """The base of relative config paths (see the module docstring)."""
    if not config_files:
        return Path.cwd()
    first = config_files[0]
    absolute = getattr(first, "absolute", None)  # a jsonargparse Path knows its absolute form
    first = Path(str(absolute if absolute is not None and not callable(absolute) else first)).resolve()
    return first.parent.parent if first.parent.name == "configs" else first.parent


def _items(node: Any):
    if isinstance(node, dict):
        return list(node.items())
    return list(vars(node).items()) if hasattr(node, "__dict__") else []


def config_paths(node: Any, keys: frozenset = PATH_KEYS, prefix: str = ""):
    """Yield ``(dotted key, parent, key, value)`` for every string value under a path key."""
    for key, value in _items(node):
        if isinstance(value, str) and key in keys:
            yield f"{prefix}{key}", node, key, value
        elif isinstance(value, (dict, list)) or hasattr(value, "__dict__"):
            children = enumerate(value) if isinstance(value, list) else [(None, value)]
            for i, child in children:
                if not isinstance(child, (str, int, float, bool)) and child is not None:
                    yield from config_paths(child, keys, f"{prefix}{key}." if i is None else f"{prefix}{key}.{i}.")


def resolve_paths(node: Any, base: Path) -> None:
    """Make every relative path value under ``node`` absolute against ``base``, in place."""
    for _, parent, key, value in list(config_paths(node)):
        if value and not Path(value).is_absolute() and "://" not in value:
            resolved = str((base / value).resolve())
            if isinstance(parent, dict):
                parent[key] = resolved
            else:
                setattr(parent, key, resolved)


def run_folder_of(ckpt_path: str | Path) -> Path | None:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/x.ckpt`` with ``<run>/config.yaml``)."""
    ckpt = Path(ckpt_path).resolve()
    run = ckpt.parent.parent
    return run if ckpt.parent.name == "checkpoints" and (run / "config.yaml").is_file() else None


def stored_wandb_id(run: Path, ckpt_path: str | Path | None = None) -> str | None:
    """The W&B run id of a run folder (its ``wandb_id`` file, else the checkpoint's copy)."""
    f = run / WANDB_ID_FILE
    if f.is_file():
        return f.read_text().strip() or None
    if ckpt_path and Path(ckpt_path).is_file():
        return torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("rsgm_wandb_id")
    return None


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 20 s``, ``2 h 05 min``, ``3 d 4 h``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _say(trainer: Trainer, line: str) -> None:
    if not trainer.is_global_zero:
        return
    bar = trainer.progress_bar_callback
    if bar is not None and hasattr(bar, "print"):
        bar.print(line)
    else:
        print(line, flush=True)


class TimeEstimate(Callback):
    """Prints the whole run's expected time from the first ``n_batches`` timed training
    batches (the first batch is a warm-up and not timed), and again with validation once
    the first validation epoch has been timed. Says so when the run exceeds an hour."""

    def __init__(self, n_batches: int = 5) -> None:
        self.n_batches = n_batches
        self.seen, self.t0, self.per_batch, self.per_val, self.val_t0 = 0, None, None, None, None

    def _total_batches(self, trainer: Trainer) -> float:
        per_epoch = trainer.num_training_batches
        epochs_left = (trainer.max_epochs or 0) - trainer.current_epoch if trainer.max_epochs and trainer.max_epochs > 0 else math.inf
        total = per_epoch * epochs_left
        if trainer.max_steps and trainer.max_steps > 0:
            # global_step counts optimizer steps; a batch makes one or more of them
            total = min(total, per_epoch * math.ceil(trainer.max_steps / max(per_epoch, 1)))
        return total

    def _report(self, trainer: Trainer, with_val: bool) -> None:
        total = self._total_batches(trainer)
        if not math.isfinite(total):
            _say(trainer, f"rsgm: {self.per_batch:.2f} s per training batch; no max_epochs/max_steps, so no total estimate")
            return
        seconds = total * self.per_batch
        how = f"{int(total):,} batches x {self.per_batch:.2f} s"
        if with_val:
            every = trainer.check_val_every_n_epoch or 1
            n_val = max(0, ((trainer.max_epochs or 0) - trainer.current_epoch) // every)
            seconds += n_val * self.per_val
            how += f" + {n_val} validations x {self.per_val:.1f} s"
        warn = "; over an hour: lower --trainer.max_epochs or use a smaller config to try things out" if seconds > 3600 else ""
        _say(trainer, f"rsgm: estimated time for this run: {duration(seconds)} ({how}){warn}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == 1 and self.t0 is None:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        timed = self.seen - 1
        if self.per_batch is None and self.t0 is not None and (timed >= self.n_batches or batch_idx + 1 >= trainer.num_training_batches):
            self.per_batch = (time.perf_counter() - self.t0) / max(timed, 1)
            self._report(trainer, with_val=False)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and self.per_val is None:
            self.val_t0 = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.per_val is not None or self.val_t0 is None or self.per_batch is None:
            return
        self.per_val = time.perf_counter() - self.val_t0
        if trainer.max_epochs and trainer.current_epoch + 1 < trainer.max_epochs:
            self._report(trainer, with_val=True)


class RunGuard(Callback):
    """Keeps one training in one run: stores the W&B run id in every checkpoint, and on
    Ctrl-C saves ``last.ckpt``, finishes the W&B run cleanly and prints the exact command
    that resumes into the same run folder and W&B run."""

    def __init__(self, ckpt_dir: Path, argv: list[str], wandb_id: str | None) -> None:
        self.ckpt_dir, self.argv, self.wandb_id = Path(ckpt_dir), list(argv), wandb_id

    def resume_command(self, ckpt: Path) -> str:
        argv, skip = [], False
        for a in self.argv:  # drop an earlier --ckpt_path
            if skip:
                skip = False
                continue
            if a == "--ckpt_path":
                skip = True
                continue
            if not a.startswith("--ckpt_path="):
                argv.append(a)
        return " ".join(["rsgm", *map(shlex.quote, argv), "--ckpt_path", shlex.quote(str(ckpt))])

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if self.wandb_id:
            checkpoint["rsgm_wandb_id"] = self.wandb_id

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt) or trainer.state.fn != "fit":
            return
        ckpt = self.ckpt_dir / "last.ckpt"
        trainer.save_checkpoint(ckpt)  # a full checkpoint (optimizers, loops) so the resume continues exactly
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger.experiment.finish()
        if trainer.is_global_zero:
            print(f"\nrsgm: interrupted at epoch {trainer.current_epoch}, step {trainer.global_step}; "
                  f"checkpoint saved. Resume with:\n  {self.resume_command(ckpt.resolve())}", file=sys.stderr, flush=True)
