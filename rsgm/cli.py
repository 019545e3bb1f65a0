"""The ``rsgm`` command: ``rsgm fit|validate|test|predict --config X.yaml`` and the commands
of ``EXTRA_COMMANDS`` (``rsgm serve``, ...). ``rsgm --help`` lists them all.

A LightningCLI in subclass mode: every config names its LightningModule and DataModule by
``class_path``. On top of plain LightningCLI, rsgm

* gives each run its own folder ``<run_dir>/<config name>/<subcommand>-<time>`` holding the
  resolved config, ``checkpoints/last.ckpt``, plots and tables; ``fit --ckpt_path
  <run>/checkpoints/last.ckpt`` continues that folder and its W&B run;
* resolves relative paths in ``model`` / ``data`` settings against the project folder
  (``rsgm.utils.run_folder``) and sets the data's ``detector`` on every model part;
* logs to Weights & Biases in offline mode by default (no login, files under the run folder),
  grouped by config and subcommand and tagged with the pillar; ``--logger csv`` writes
  ``metrics.csv`` instead, ``--wandb_mode online`` syncs live, ``--logger none`` logs nothing;
* refuses to score random weights (``test``/``validate``/``predict`` without ``--ckpt_path``)
  unless ``--allow_untrained true``, and to overwrite an export unless ``--overwrite true``;
* turns every user mistake (:class:`rsgm.errors.RSGMError`, a missing file) into one line
  ``rsgm: <message>`` with exit status 1 and removes the run folder it had created; add
  ``--debug`` for the traceback.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import secrets
import shutil
import sys
import warnings
from datetime import datetime
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from rsgm.errors import MissingFileError, RSGMError
from rsgm.utils.distributed import launcher_is_global_zero, launcher_run_id
from rsgm.utils.dashboard import define_dashboard, pillar_of
from rsgm.utils.run_folder import (EXPORT_KEYS, WANDB_ID_FILE, RunGuard, TimeEstimate, config_paths, project_dir,
                                   resolve_paths, run_folder_of, stored_wandb_id)

# Lightning's subcommands, with the one line `rsgm --help` shows for each.
LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a model; writes a run folder <run_dir>/<config>/fit-<time>/ (resume: --ckpt_path its last.ckpt)",
    "validate": "score a trained checkpoint (--ckpt_path) on the validation split",
    "test": "score a trained checkpoint (--ckpt_path) on the test split, or run an attack / protocol config",
    "predict": "run a trained checkpoint (--ckpt_path) on the predict split",
}

# Subcommands beside Lightning's: name -> (module:function taking argv, one-line help).
# A new subcommand is one line here; `rsgm --help` lists them all.
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("rsgm.serving.cli:main", "serve a B4B-defended encoder over HTTP"),
    "convert-zdc": ("rsgm.physics.zdc_files:convert_main", "convert published ZDC pickles once to rsgm's HDF5 layout"),
    "fetch-images": ("rsgm.datamodules.laionmi_fetch:main", "fill the LAION-mi image cache from the published tables (resumable)"),
}

# Set by the first process of a run, so DDP worker processes that re-run the command line
# write into the same run folder instead of creating their own.
RUN_DIR_ENV = "RSGM_RUN_DIR"

# The run folder this process created (removed again if the run fails before a checkpoint).
_CREATED: dict[str, Path | None] = {"run_dir": None}


def usage() -> str:
    lines = ["usage: rsgm SUBCOMMAND --config CONFIG.yaml [--key value ...] [--debug]", "",
             "Reliable and safe generative models: ZDC simulation, B4B encoder defence, membership and",
             "dataset inference, each a config under configs/. `rsgm SUBCOMMAND --help` lists its options.", "",
             "subcommands:"]
    commands = {**LIGHTNING_COMMANDS, **{name: text for name, (_, text) in EXTRA_COMMANDS.items()}}
    width = max(map(len, commands)) + 2
    lines += [f"  {name:<{width}}{text}" for name, text in commands.items()]
    lines += ["", "--debug (any subcommand) shows the traceback of an error instead of its one-line message."]
    return "\n".join(lines)


class _DropLitTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(name in str(record.msg) for name in ("litlogger", "litmodels"))


def quiet_libraries() -> None:
    """Silence the messages that say nothing about the run, at the logger or warning that emits them."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning_fabric.utilities.rank_zero", "pytorch_lightning.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLitTips) for f in logger.filters):
            logger.addFilter(_DropLitTips())
    # Lightning 2.6's own _pytree helper trips torch's deprecation of LeafSpec checks.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


class ConfigToLogger(SaveConfigCallback):
    """Writes ``config.yaml`` into the run folder and logs the same config to the logger once."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is None:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                define_dashboard(logger.experiment)
        # Paths and other objects become strings, so every logger accepts the dict.
        resolved = json.loads(json.dumps(self.config.as_dict(), default=str))
        trainer.logger.log_hyperparams(resolved)


class RSGMCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        self.argv = list(kwargs.get("args") or sys.argv[1:])  # for the resume command
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--logger", choices=["wandb", "csv", "none"], default="wandb",
                            help="Where metrics go: W&B (offline unless --wandb_mode online), CSV, or nowhere.")
        parser.add_argument("--wandb_mode", choices=["offline", "online"], default="offline",
                            help="online needs a prior `wandb login`.")
        parser.add_argument("--wandb_project", default="rsgm")
        parser.add_argument("--run_dir", default="runs", help="Parent folder of all run folders.")
        parser.add_argument("--run_name", default=None,
                            help="Sub-folder name; defaults to the config file's name.")
        # -- ZDC simulated showers: `rsgm predict ... --output showers.h5` (rsgm/callbacks/prediction_writer.py)
        parser.add_argument("--output", default=None,
                            help="rsgm predict with a ZDC simulator: write the responses to this .h5 or .pkl file.")
        parser.add_argument("--allow_untrained", type=bool, default=False,
                            help="validate/test/predict a model with trainable weights without --ckpt_path (smoke tests).")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit may replace an existing export (model export_dir / export_path).")

    # ------------------------------------------------------------------ config

    def _parse_ckpt_path(self) -> None:
        self.subcommand = self.config.get("subcommand")
        ckpt = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
        if ckpt and not Path(ckpt).is_file():
            raise MissingFileError(f"checkpoint {ckpt} not found; pass --ckpt_path <run folder>/checkpoints/last.ckpt "
                                   f"of an earlier `rsgm fit` ({self._latest_checkpoint_hint()})")
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        base = project_dir(cfg.get("config") or [])
        for section in ("model", "data"):
            if cfg.get(section) is not None:
                resolve_paths(cfg[section], base)
        self._link_detector(cfg)
        if self.subcommand == "fit" and not cfg.get("overwrite"):
            for key, _, _, value in config_paths(cfg.get("model"), EXPORT_KEYS, "model."):
                if Path(value).exists() and not cfg.get("ckpt_path"):
                    raise RSGMError(f"{value} already exists (an earlier export, {key}); pass --overwrite true to replace it "
                                    f"or --{key} <new path>")

    @staticmethod
    def _link_detector(cfg) -> None:
        """One value, one place: ``data.detector`` is the detector of every model part."""
        data = cfg.get("data")
        detector = getattr(getattr(data, "init_args", None), "detector", None)
        if detector and cfg.get("model") is not None:
            for _, parent, key, _ in list(config_paths(cfg["model"], frozenset({"detector"}))):
                setattr(parent, key, detector) if not isinstance(parent, dict) else parent.__setitem__(key, detector)

    def after_instantiate_classes(self) -> None:
        # The full config is logged once by ConfigToLogger; not again, flattened, per module.
        for obj in (self.model, self.datamodule):
            if obj is not None:
                obj._log_hyperparams = False

    # ------------------------------------------------------------------ run folder, logger, trainer

    def _run_name(self) -> str:
        name = self._get(self.config, "run_name")
        if name:
            return name
        configs = self._get(self.config, "config") or []
        if configs:
            return Path(str(configs[-1])).stem
        return type(self.model).__name__.lower() if hasattr(self, "model") else "run"

    def _latest_checkpoint_hint(self) -> str:
        root = Path(self._get(self.config, "run_dir") or "runs") / self._run_name()
        found = sorted(root.glob("fit-*/checkpoints/last.ckpt"))
        return f"the latest is {found[-1]}" if found else f"none found under {root}/fit-*/checkpoints/"

    def _make_run_dir(self) -> Path:
        if os.environ.get(RUN_DIR_ENV):
            return Path(os.environ[RUN_DIR_ENV])
        ckpt = self._get(self.config, "ckpt_path")
        resumed = run_folder_of(ckpt) if ckpt and self.subcommand == "fit" else None
        if resumed is not None:
            path = resumed
        else:
            # Processes started by torchrun / SLURM on several nodes share the launcher's run id
            # instead of a per-process timestamp; only global rank 0 creates files.
            stamp = launcher_run_id() or datetime.now().strftime("%Y%m%d-%H%M%S-%f")
            path = Path(self._get(self.config, "run_dir")) / self._run_name() / f"{self.subcommand}-{stamp}"
            if launcher_is_global_zero():
                path.mkdir(parents=True, exist_ok=True)
                _CREATED["run_dir"] = path
        os.environ[RUN_DIR_ENV] = str(path)
        return path

    def _make_logger(self, path: Path):
        kind = self._get(self.config, "logger")
        if kind == "none":
            return False
        if kind == "csv":
            return CSVLogger(save_dir=str(path), name="", version="")
        import wandb

        run_id = stored_wandb_id(path, self._get(self.config, "ckpt_path")) if self.subcommand == "fit" else None
        run_id = run_id or secrets.token_hex(4)
        (path / WANDB_ID_FILE).write_text(run_id)
        logger = WandbLogger(
            save_dir=str(path), project=self._get(self.config, "wandb_project"), name=f"{path.parent.name}/{path.name}",
            id=run_id, group=self._run_name(), job_type=self.subcommand, tags=[pillar_of(self.model)],
            offline=self._get(self.config, "wandb_mode") == "offline", settings=wandb.Settings(silent=True),
        )
        logger._wandb_init.pop("anonymous", None)  # Lightning passes None, which W&B warns about
        return logger

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        path = Path(trainer_cfg["default_root_dir"]) if trainer_cfg.get("default_root_dir") else self._make_run_dir()
        if launcher_is_global_zero():  # the run folder is created once, by global rank 0
            path.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("default_root_dir", str(path))
        logger = None
        if trainer_cfg.get("logger") in (None, True):
            logger = self._make_logger(path)
            kwargs.setdefault("logger", logger)
        callbacks = trainer_cfg.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if self.subcommand == "fit":
            if trainer_cfg.get("enable_checkpointing", True) is not False and not any(
                isinstance(c, ModelCheckpoint) for c in callbacks
            ):
                # One checkpoint, last.ckpt, replaced every epoch; configure a ModelCheckpoint for more.
                callbacks.append(ModelCheckpoint(dirpath=str(path / "checkpoints"), filename="last", save_top_k=1, save_on_train_epoch_end=True,
                                                 enable_version_counter=False))
            wandb_id = logger.version if isinstance(logger, WandbLogger) else None
            callbacks += [TimeEstimate(), RunGuard(path / "checkpoints", self.argv, wandb_id)]
        elif not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            # validate/test/predict save nothing; Lightning's default ModelCheckpoint would only
            # warn "dirpath has changed" when it restores the fit's checkpoint state.
            kwargs["enable_checkpointing"] = False
            # ... and the fit's training-only callbacks (checkpointing, time estimate) are not needed here
            warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint need to be provided.*")
        # -- ZDC simulated showers: attach the prediction writer for `rsgm predict --output X`
        if self.subcommand == "predict" and self._get(self.config, "output"):
            from rsgm.callbacks.prediction_writer import ZDCPredictionWriter

            callbacks.append(ZDCPredictionWriter(self._get(self.config, "output")))
        kwargs["callbacks"] = callbacks
        if trainer_cfg.get("enable_model_summary") is None:
            # Lightning's table ends in "Total FLOPs: 0" for models without an example input;
            # _run_subcommand prints the parameter count instead.
            kwargs["enable_model_summary"] = False
        self._own_summary = kwargs.get("enable_model_summary") is False
        return super().instantiate_trainer(**kwargs)

    # ------------------------------------------------------------------ running

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand in ("validate", "test", "predict"):
            self._refuse_untrained(subcommand)
        if self._own_summary and self.trainer.is_global_zero:
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            print(f"rsgm: {type(self.model).__name__}, {trainable:,} trainable parameters", flush=True)
        super()._run_subcommand(subcommand)
        self._report(subcommand)

    def _refuse_untrained(self, subcommand: str) -> None:
        if self._get(self.config, "ckpt_path") or self._get(self.config, "allow_untrained"):
            return
        needs = getattr(self.model, "needs_checkpoint", None)
        if needs is None:  # a module whose weights all come from configured paths has none to train
            needs = any(p.requires_grad for p in self.model.parameters())
        if needs:
            raise RSGMError(f"{type(self.model).__name__} has trainable weights but no --ckpt_path was given, so `rsgm "
                            f"{subcommand}` would score random weights; pass --ckpt_path <fit run>/checkpoints/last.ckpt "
                            f"({self._latest_checkpoint_hint()}), or --allow_untrained true for a smoke test")

    def _report(self, subcommand: str) -> None:
        """Name the exports and the run folder; close the W&B run."""
        if not self.trainer.is_global_zero:
            return
        for key, _, _, value in config_paths(self.config[subcommand].get("model"), EXPORT_KEYS, "model."):
            if subcommand == "fit" and Path(value).exists():
                print(f"rsgm: exported {key} -> {value}", flush=True)
                for logger in self.trainer.loggers:
                    if isinstance(logger, WandbLogger):
                        logger.experiment.summary[f"export/{key}"] = value
        folder = Path(self.trainer.default_root_dir)
        print(f"rsgm: run folder {folder}", flush=True)
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                offline = Path(logger.experiment.dir).parent
                logger.experiment.finish()
                if self._get(self.config, "wandb_mode") == "offline":
                    print(f"rsgm: W&B offline run {offline}; upload it with: wandb sync {offline}", flush=True)


def config_error_summary(message: str) -> str:
    """The line of a (multi-line) jsonargparse error that names the offending key or value."""
    text = str(message)
    lines = [line.strip(" -") for line in text.splitlines() if line.strip()]
    found = lines[0] if lines else "invalid configuration"
    for marker in ("is not accepted", "Unrecognized arguments", "not expected", "does not exist", "No such file",
                   "Expected a", "is required"):
        hits = [line for line in lines if marker in line and not line.startswith("Expected a <class 'NoneType'>")]
        if hits:
            found = hits[0]
            break
    key, given = re.search(r'(?:Parser key|Key) "([^"]+)"', text), re.search(r"Given value: (.+)", text)
    if key and key.group(1) not in found:
        found = f"{key.group(1)}: {found}"
    if given and "Expected a" in found and given.group(1).strip() not in found:
        found += f" (given: {given.group(1).strip()})"
    return found


def user_error(err: BaseException) -> str | None:
    """The one-line message of a user mistake anywhere in ``err``'s chain (jsonargparse wraps
    errors raised while building a model), or None for a bug."""
    seen, missing = set(), None
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, RSGMError):
            return str(err)
        if isinstance(err, FileNotFoundError) and missing is None:
            missing = f"{err.strerror}: {err.filename}" if err.filename else " ".join(str(err).split())
        err = err.__cause__ or err.__context__
    return missing


def _discard_failed_run() -> None:
    """Close W&B and remove the run folder this process created, unless it holds a checkpoint."""
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=1)
    run = _CREATED["run_dir"]
    if run is not None and run.is_dir() and not any(run.glob("checkpoints/*.ckpt")):
        shutil.rmtree(run, ignore_errors=True)
        for parent in (run.parent, run.parent.parent):
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    quiet_libraries()
    if args is None:  # LightningCLI reads sys.argv itself (and warns when also given args)
        sys.argv = [sys.argv[0], *argv]
    _CREATED["run_dir"] = None
    try:
        if argv[0] in EXTRA_COMMANDS:
            module, func = EXTRA_COMMANDS[argv[0]][0].split(":")
            getattr(importlib.import_module(module), func)(argv[1:])
            return
        RSGMCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=ConfigToLogger,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False, "allow_abbrev": False,
                           **{name: {"allow_abbrev": False} for name in LIGHTNING_COMMANDS}},
            args=None if args is None else argv,
        )
    except ArgumentError as err:
        _discard_failed_run()
        if debug:
            raise
        # jsonargparse explains a bad key over a dozen lines; one line naming it is enough.
        raise SystemExit(f"rsgm: config error: {config_error_summary(err)}") from None
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as err:
        _discard_failed_run()
        message = user_error(err)
        if message is None or debug:
            raise
        raise SystemExit(f"rsgm: {message}") from None


if __name__ == "__main__":
    main()
