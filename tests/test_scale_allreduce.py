"""rsgm.utils.distributed on 2 gloo processes: gradients averaged over ranks with a missing
gradient counted as zero, buffers from rank 0, per-sample seeded noise. Kept free of
Lightning imports so the spawned processes start quickly."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rsgm.utils.distributed import all_reduce_gradients, broadcast_buffers, index_seeded_normal


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reduce_worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    both, one, none = (nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(3)))
    both.grad = torch.tensor([1.0, 2.0]) if rank == 0 else torch.tensor([3.0, 6.0])
    one.grad = torch.tensor([4.0]) if rank == 0 else None  # e.g. an expert without samples on rank 1
    all_reduce_gradients([both, one, none])
    bn = nn.BatchNorm1d(2)
    bn.running_mean.fill_(float(rank + 1))
    broadcast_buffers(bn)
    torch.save({"both": both.grad, "one": one.grad, "none": none.grad, "mean": bn.running_mean}, f"{out}/{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_all_reduce_gradients_averages_and_counts_missing_as_zero(tmp_path):
    mp.start_processes(_reduce_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert got["both"].tolist() == [2.0, 4.0]   # (1 + 3) / 2, (2 + 6) / 2
        assert got["one"].tolist() == [2.0]         # (4 + 0) / 2: the missing gradient counts as zero
        assert got["none"] is None                  # no rank used it: the optimiser skips it
        assert got["mean"].tolist() == [1.0, 1.0]   # rank 0's buffers everywhere


def test_index_seeded_normal_depends_on_the_index_only():
    whole = index_seeded_normal(torch.arange(10), 3, seed=7)
    assert torch.equal(index_seeded_normal(torch.tensor([6, 2]), 3, seed=7), whole[[6, 2]])  # any batching
    assert not torch.equal(index_seeded_normal(torch.arange(10), 3, seed=8), whole)
    assert abs(float(index_seeded_normal(torch.arange(4000), 1, seed=0).std()) - 1) < 0.05
