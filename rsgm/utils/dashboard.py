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


def log_step(trainer: Trainer) -> int:
    """The step Lightning logs metrics at (batches that made an optimizer step; for a GAN
    with two optimizers this is not ``global_step``), so images and tables sit beside them."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


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
    at the step of the metrics. Columns holding arrays or lists are left out."""
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    records = rows.to_dict("records") if hasattr(rows, "to_dict") else list(rows)
    if not records:
        return
    columns = [c for c in records[0] if not isinstance(records[0][c], (list, tuple, dict)) and getattr(records[0][c], "ndim", 0) == 0]
    data = [[_plain(r.get(c)) for c in columns] for r in records]
    for logger in loggers:
        logger.log_table(key=f"tables/{name}", columns=[str(c) for c in columns], data=data, step=log_step(trainer))


def read_offline_run(folder, wait_s: float = 60.0) -> dict[str, Any]:
    """Read an offline W&B run folder (``wandb/offline-run-*``) without syncing it.

    Returns ``{"run": the run record (id, group, job_type, tags), "config": {key: value},
    "history": [{key: value, ...} per logged step], "summary": {key: value}}``; images and
    tables appear in the history as dicts with ``_type`` ``image-file`` / ``table-file`` and
    their files lie under ``<folder>/files/media/``. The ``.wandb`` file is a LevelDB-style
    log of protobuf records (7-byte file header, 32 KiB blocks of CRC/length/type chunks).

    W&B's service writes the file after ``finish()`` returns, so the reader waits up to
    ``wait_s`` seconds for the run's closing ``exit`` record before it parses anything.
    """
    import json
    import time
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(folder).glob("run-*.wandb")
    deadline = time.monotonic() + wait_s
    while True:
        records = [pb.Record.FromString(raw) for raw in _log_chunks(path.read_bytes())]
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path}: no exit record after {wait_s:g} s (the W&B run was not finished)")
        time.sleep(0.2)
    out: dict[str, Any] = {"run": {}, "config": {}, "history": [], "summary": {}}

    def items(entries):
        got: dict[str, Any] = {}
        for e in entries:
            *parents, last = list(e.nested_key) or [e.key]
            node = got
            for k in parents:
                node = node.setdefault(k, {})
            node[last] = json.loads(e.value_json)
        return got

    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = {"id": rec.run.run_id, "group": rec.run.run_group, "job_type": rec.run.job_type,
                          "tags": list(rec.run.tags), "name": rec.run.display_name}
            out["config"].update(items(rec.run.config.update))
        elif kind == "config":
            out["config"].update(items(rec.config.update))
        elif kind == "history":
            out["history"].append(items(rec.history.item))
        elif kind == "summary":
            out["summary"].update(items(rec.summary.update))
    return out


def _log_chunks(data: bytes, block: int = 32768) -> list[bytes]:
    """The complete records of a LevelDB-style log (after its 7-byte file header); a record
    still being written at the end of the file is left out."""
    pos, chunks, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:  # block padding
            pos += left
            continue
        if pos + 7 + length > len(data):
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
    return chunks
