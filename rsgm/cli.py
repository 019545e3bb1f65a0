"""The ``rsgm`` command: ``rsgm fit|validate|test|predict --config X.yaml`` and ``rsgm serve``.

A LightningCLI in subclass mode: every config names its LightningModule and DataModule by
``class_path``. On top of plain LightningCLI, rsgm

* gives each run its own folder ``<run_dir>/<run_name>/<timestamp>`` holding the resolved
  config, ``checkpoints/last.ckpt``, plots and tables;
* logs to Weights & Biases in offline mode by default (no login, files under the run folder);
  ``--logger csv`` writes ``metrics.csv`` instead, ``--wandb_mode online`` syncs live when
  the user is logged in, ``--logger none`` logs nothing;
* stores the full resolved config with the run and in the W&B run config.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, WandbLogger

# Subcommands beside Lightning's fit/validate/test/predict: name -> (module:function taking
# argv, one-line help). A new subcommand is one line here; `rsgm --help` lists them all.
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("rsgm.serving.cli:main", "serve a B4B-defended encoder over HTTP"),
    "fetch-images": ("rsgm.datamodules.laionmi_fetch:main", "fill the LAION-mi image cache from the published tables (resumable)"),
}

# Set by the first process of a run, so DDP worker processes that re-run the command line
# write into the same run folder instead of creating their own.
RUN_DIR_ENV = "RSGM_RUN_DIR"


class ConfigToLogger(SaveConfigCallback):
    """Writes ``config.yaml`` into the run folder and logs the same config to the logger."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is None:
            return
        # Paths and other objects become strings, so every logger accepts the dict.
        resolved = json.loads(json.dumps(self.config.as_dict(), default=str))
        trainer.logger.log_hyperparams(resolved)


class RSGMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--logger", choices=["wandb", "csv", "none"], default="wandb",
                            help="Where metrics go: W&B (offline unless --wandb_mode online), CSV, or nowhere.")
        parser.add_argument("--wandb_mode", choices=["offline", "online"], default="offline",
                            help="online needs a prior `wandb login`.")
        parser.add_argument("--wandb_project", default="rsgm")
        parser.add_argument("--run_dir", default="runs", help="Parent folder of all run folders.")
        parser.add_argument("--run_name", default=None,
                            help="Sub-folder name; defaults to the config file's name.")

    def _run_name(self) -> str:
        name = self._get(self.config, "run_name")
        if name:
            return name
        configs = self._get(self.config, "config") or []
        if configs:
            return Path(str(configs[-1])).stem
        return type(self.model).__name__.lower() if hasattr(self, "model") else "run"

    def _make_run_dir(self) -> Path:
        if os.environ.get(RUN_DIR_ENV):
            return Path(os.environ[RUN_DIR_ENV])
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        path = Path(self._get(self.config, "run_dir")) / self._run_name() / f"{self.subcommand}-{stamp}"
        path.mkdir(parents=True, exist_ok=True)
        os.environ[RUN_DIR_ENV] = str(path)
        return path

    def _make_logger(self, path: Path):
        kind = self._get(self.config, "logger")
        if kind == "none":
            return False
        if kind == "csv":
            return CSVLogger(save_dir=str(path), name="", version="")
        return WandbLogger(
            save_dir=str(path),
            project=self._get(self.config, "wandb_project"),
            name=f"{path.parent.name}/{path.name}",
            offline=self._get(self.config, "wandb_mode") == "offline",
        )

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        path = Path(trainer_cfg["default_root_dir"]) if trainer_cfg.get("default_root_dir") else self._make_run_dir()
        path.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("default_root_dir", str(path))
        if trainer_cfg.get("logger") in (None, True):
            kwargs.setdefault("logger", self._make_logger(path))
        callbacks = trainer_cfg.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if trainer_cfg.get("enable_checkpointing", True) is not False and not any(
            isinstance(c, ModelCheckpoint) for c in callbacks
        ):
            callbacks.append(ModelCheckpoint(dirpath=str(path / "checkpoints"), save_last=True))
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


def config_error_summary(message: str) -> str:
    """The line of a (multi-line) jsonargparse error that names the offending key or value."""
    lines = [line.strip(" -") for line in str(message).splitlines() if line.strip()]
    for marker in ("is not accepted", "Unrecognized arguments", "not expected", "does not exist", "No such file",
                   "Expected a", "is required"):
        for line in lines:
            if marker in line and not line.startswith("Expected a <class 'NoneType'>"):
                return line
    return lines[0] if lines else "invalid configuration"


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in EXTRA_COMMANDS:
        import importlib

        module, func = EXTRA_COMMANDS[argv[0]][0].split(":")
        getattr(importlib.import_module(module), func)(argv[1:])
        return
    try:
        RSGMCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=ConfigToLogger,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
            args=args,
        )
    except ArgumentError as err:
        # jsonargparse explains a bad key over a dozen lines; one line naming it is enough.
        sys.exit(f"rsgm: config error: {config_error_summary(err)}")


if __name__ == "__main__":
    main()
