import numpy as np
import pytest
import scipy.stats
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rsgm.metrics.wasserstein import ChannelWasserstein, deduplicate, quartile_wasserstein, wasserstein_1d
from rsgm.physics.channels import channel_masks, channel_values


@pytest.mark.parametrize("n,m", [(1, 1), (7, 3), (500, 1200)])
def test_wasserstein_matches_scipy(n, m):
    rng = np.random.default_rng(n + m)
    u, v = rng.gamma(2.0, 3.0, n), rng.normal(5.0, 2.0, m)
    u[: n // 2] = np.round(u[: n // 2])  # ties
    assert float(wasserstein_1d(torch.tensor(u), torch.tensor(v))) == pytest.approx(scipy.stats.wasserstein_distance(u, v), rel=1e-12, abs=1e-12)


def test_wasserstein_rejects_empty():
    with pytest.raises(ValueError, match="non-empty"):
        wasserstein_1d(torch.tensor([]), torch.tensor([1.0]))


def test_quartiles_match_scipy_by_hand():
    rng = np.random.default_rng(0)
    real, fake = rng.gamma(1.0, 50.0, (400, 5)), rng.gamma(1.2, 45.0, (400, 5))
    intensity = real.sum(1)
    w1_q, edges = quartile_wasserstein(torch.tensor(real), torch.tensor(fake), torch.tensor(intensity))
    q = np.quantile(intensity, [0.25, 0.5, 0.75])
    bins = np.digitize(intensity, q, right=True)
    for k in range(4):
        rows = bins == k
        expected = np.mean([scipy.stats.wasserstein_distance(real[rows, c], fake[rows, c]) for c in range(5)])
        assert float(w1_q[k]) == pytest.approx(expected, rel=1e-10)
    assert edges[0] == intensity.min() and edges[-1] == intensity.max()


def random_images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.rand(n, 1, 44, 44, generator=g) * 3), torch.poisson(torch.rand(n, 1, 44, 44, generator=g) * 3.5)


def scipy_reference(real, fake):
    masks = channel_masks(44, 44)
    r, f = channel_values(real, masks).numpy(), channel_values(fake, masks).numpy()
    return np.array([scipy.stats.wasserstein_distance(r[:, c], f[:, c]) for c in range(5)])


def test_metric_matches_scipy_and_ignores_duplicates():
    real, fake = random_images(60, 1)
    metric = ChannelWasserstein((44, 44))
    metric.update(real[:40], fake[:40], torch.arange(40))
    metric.update(real[30:], fake[30:], torch.arange(30, 60))  # rows 30-39 arrive twice
    out = metric.compute()
    expected = scipy_reference(real, fake)
    assert np.allclose(out["w1"].numpy(), expected, rtol=1e-10)
    assert float(out["w1_mean"]) == pytest.approx(expected.mean(), rel=1e-10)
    assert out["real"].shape == (60, 5)


def test_deduplicate_keeps_one_row_per_index():
    index, values = deduplicate(torch.tensor([3, 1, 3, 2, 1]), torch.tensor([30, 10, 31, 20, 11]))
    assert index.tolist() == [1, 2, 3] and values.tolist() == [10, 20, 30]


def _ddp_worker(rank, world, port, real, fake, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    n = len(real)
    # DistributedSampler-style sharding with padding: rank r takes r, r + world, ...; the
    # padded tail repeats index 0, as DistributedSampler does.
    idx = torch.arange(n + (-n) % world)
    idx[idx >= n] = idx[idx >= n] - n
    mine = idx[rank::world]
    metric = ChannelWasserstein((44, 44))
    metric.update(real[mine], fake[mine], mine)
    out = metric.compute()
    if rank == 0:
        queue.put(out["w1"].numpy())
    dist.barrier()
    dist.destroy_process_group()


def test_metric_is_exact_under_two_process_ddp():
    real, fake = random_images(51, 2)  # odd size: the sampler pads one duplicate
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + np.random.default_rng().integers(0, 2000)
    mp.start_processes(_ddp_worker, args=(2, int(port), real, fake, queue), nprocs=2, join=True, start_method="spawn")
    assert np.allclose(queue.get(timeout=5), scipy_reference(real, fake), rtol=1e-10)
