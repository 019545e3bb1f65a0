"""W&B dashboards: grouping and tags for a run, the step metric and summaries, and
:func:`log_table`, which callbacks call to put a result table into W&B beside its CSV/JSON.

Every function is a no-op when W&B is not among the trainer's loggers, and only global
rank 0 logs. What a user sees per pillar: docs/wandb.md.
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger

# LightningModule file -> pillar tag.
PILLARS = {"sdi_gan": "zdc", "expertsim": "zdc", "b4b": "b4b", "diffusion": "privacy", "diffusion_attack": "privacy"}
# Run summaries: the value W&B shows in its runs table for each metric.
SUMMARIES = {"val/w1_mean": "min", "test/w1_mean": "last", "val/acc": "max", "cdi/audit_p_value": "last",
             "cdi/min_P_all": "last", "cdi/min_P_gray": "last", "cdi/null_false_positive_rate": "last"}


def pillar_of(model: Any) -> str:
    """``zdc``, ``b4b`` or ``privacy`` from the module that defines the model class."""
    return PILLARS.get(type(model).__module__.rsplit(".", 1)[-1], "other")


def define_dashboard(experiment: Any) -> None:
    """Plot every metric (and image and table) against ``trainer/global_step``, so an image
    sits at the step of the metrics it was drawn from; set the summary of key metrics."""
    experiment.define_metric("trainer/global_step")
    experiment.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    for key, summary in SUMMARIES.items():
        experiment.define_metric(key, step_metric="trainer/global_step", summary=summary)


def wandb_loggers(trainer: Trainer) -> list[WandbLogger]:
    if not trainer.is_global_zero:
        return []
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def _plain(value: Any) -> Any:
    """Table cells W&B accepts: numbers, strings, None (NaN becomes None)."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value if value is None or isinstance(value, (int, float, str, bool)) else str(value)


def log_table(trainer: Trainer, name: str, rows: Any) -> None:
    """Log ``rows`` (a pandas DataFrame or a list of dicts) as the W&B table ``tables/<name>``
    at the current global step. Columns holding arrays or lists are left out."""
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    records = rows.to_dict("records") if hasattr(rows, "to_dict") else list(rows)
    if not records:
        return
    columns = [c for c in records[0] if not isinstance(records[0][c], (list, tuple, dict)) and getattr(records[0][c], "ndim", 0) == 0]
    data = [[_plain(r.get(c)) for c in columns] for r in records]
    for logger in loggers:
        logger.log_table(key=f"tables/{name}", columns=[str(c) for c in columns], data=data, step=trainer.global_step)
