"""Data-parallel training of manually optimised modules (the GANs) under any DDP strategy.

Lightning wraps the LightningModule in ``DistributedDataParallel``. DDP's reducer all-reduces
the gradients of *every* parameter during each backward pass and fails when one is unused
(a GAN's discriminator step never touches the generator). Instead of asking the user for
``ddp_find_unused_parameters_true``, :class:`SynchronisedManualOptimization` keeps the
reducer idle and synchronises the gradients itself, per optimiser, just before each step:

* every rank steps the same optimisers in the same order, so the collectives match;
* a parameter without a gradient on one rank (an ExpertSim expert that received no sample
  there) contributes zeros to the sum, and gets the averaged gradient if any rank used it;
  a parameter no rank used keeps ``grad = None`` everywhere (the optimiser skips it);
* the gradient is the mean over ranks (sum / world size), as DDP computes it;
* buffers (BatchNorm running statistics) are broadcast from rank 0 after every training
  batch, as DDP's ``broadcast_buffers`` does for automatic optimisation.

The weights therefore stay identical on all ranks after every step (tested in
tests/test_scale_ddp.py).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def distributed_world_size() -> int:
    """The number of processes of the default process group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_gradients(params: Iterable[nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over all ranks (a missing gradient
    counts as zeros); a parameter no rank has a gradient for keeps ``grad = None``.

    One all-reduce per (device, dtype) group; every rank must pass the same parameters in
    the same order."""
    world = distributed_world_size()
    if world == 1:
        return
    groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = defaultdict(list)
    for p in params:
        groups[(p.device, p.dtype)].append(p)
    for (device, dtype), group in groups.items():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p in group]
                         + [torch.tensor([float(p.grad is not None) for p in group], device=device, dtype=dtype)])
        dist.all_reduce(flat)
        values, used = flat[:-len(group)], flat[-len(group):]
        offset = 0
        for p, n_used in zip(group, used.tolist()):
            n = p.numel()
            p.grad = (values[offset:offset + n].view_as(p) / world).clone() if n_used > 0 else None
            offset += n


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy every buffer of ``module`` from rank ``src`` (one broadcast per (device, dtype))."""
    if distributed_world_size() == 1:
        return
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for b in module.buffers():
        groups[(b.device, b.dtype)].append(b)
    for group in groups.values():
        flat = torch.cat([b.reshape(-1) for b in group])
        dist.broadcast(flat, src)
        offset = 0
        for b in group:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def _ddp_wrapper(module: Any) -> Any:
    trainer = getattr(module, "_trainer", None)
    wrapper = getattr(getattr(trainer, "strategy", None), "model", None)
    return wrapper if isinstance(wrapper, nn.parallel.DistributedDataParallel) else None


class SynchronisedManualOptimization:
    """LightningModule mixin for manual optimisation under DDP (see the module docstring).

    The module calls ``self.manual_backward`` and ``opt.step()`` as usual; every rank must
    call ``step()`` on the same optimisers in the same order, also when it has nothing to
    back-propagate (the step then only takes part in the all-reduce)."""

    def manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        ddp = _ddp_wrapper(self)
        if ddp is None:
            return super().manual_backward(loss, *args, **kwargs)
        with ddp.no_sync():  # DDP's reducer stays idle; on_before_optimizer_step synchronises
            super().manual_backward(loss, *args, **kwargs)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        if _ddp_wrapper(self) is not None:
            all_reduce_gradients(p for group in optimizer.param_groups for p in group["params"])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if _ddp_wrapper(self) is not None:
            broadcast_buffers(self)


# -- launchers ----------------------------------------------------------------------------
def launcher_run_id() -> str | None:
    """An id every process of a multi-node job shares, set by its launcher: torchrun's
    ``--rdzv-id`` (``TORCHELASTIC_RUN_ID``) or, for a job step of several tasks, SLURM's job
    and step id; ``None`` otherwise (one process, or a launcher without a shared id)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return run_id
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        step = os.environ.get("SLURM_STEP_ID")
        return os.environ["SLURM_JOB_ID"] + (f".{step}" if step else "")
    return None


def launcher_is_global_zero() -> bool:
    """Whether this process is global rank 0 according to its launcher's environment
    (torchrun ``RANK``, SLURM ``SLURM_PROCID``, Lightning ``NODE_RANK`` / ``LOCAL_RANK``);
    true when no launcher is involved."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var) is not None:
            return int(os.environ[var]) == 0
    return int(os.environ.get("NODE_RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0


def index_seeded_normal(index: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Standard-normal rows, row ``k`` drawn from a generator seeded by ``(seed, index[k])``
    alone: the same draws for a sample whatever the batching and the number of processes
    (a DistributedSampler deals every rank a different mix of samples)."""
    # torch's CPU generator keeps 32 bits of its seed: mix the seed into 32 bits and xor the
    # index in, which keeps distinct indices on distinct streams for one seed.
    base = (seed * 0x9E3779B1) & 0xFFFFFFFF
    rows = [torch.randn(dim, generator=torch.Generator().manual_seed(base ^ i)) for i in index.tolist()]
    return torch.stack(rows) if rows else torch.empty(0, dim)
