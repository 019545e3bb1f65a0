"""The shared shape of rsgm's evaluation callbacks: gather per batch, report per epoch."""

from __future__ import annotations

import json
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from rsgm.utils.dashboard import log_table
from rsgm.utils.figures import run_dir


class SplitEvaluation(Callback):
    """Calls ``update(split, outputs)`` after every validation / test batch (not during the
    sanity check) and ``finish(split, trainer, pl_module, plot)`` at the end of each epoch;
    plots every ``plot_every_n_epochs`` validation epochs (0 = only at test) and always at
    test, where ``finish``'s return value is also written to ``<run dir>/<test_file>``."""

    test_file = "test_results.json"

    def __init__(self, plot_every_n_epochs: int = 1) -> None:
        self.plot_every_n_epochs = plot_every_n_epochs

    def update(self, split: str, outputs: dict[str, Any]) -> None:
        raise NotImplementedError

    def finish(self, split: str, trainer: Trainer, pl_module: LightningModule, plot: bool) -> Any:
        raise NotImplementedError

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.update("val", outputs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        every = self.plot_every_n_epochs
        self.finish("val", trainer, pl_module, plot=every > 0 and (trainer.current_epoch + 1) % every == 0)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.update("test", outputs)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        result = self.finish("test", trainer, pl_module, plot=True)
        if trainer.is_global_zero:
            path = run_dir(trainer) / self.test_file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2))
        # the same result as a W&B table: one row per entry of a list, else one row of its scalars
        rows = result if isinstance(result, list) else [{k: v for k, v in result.items() if not isinstance(v, (list, dict))}]
        log_table(trainer, self.test_file.removesuffix(".json"), rows)
