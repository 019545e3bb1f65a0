"""TPR@FPR and AUC against sklearn, de-duplication, and a 2-process gloo DDP run."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import roc_auc_score, roc_curve

from rsgm.metrics.membership import (
    MembershipAUC, MembershipFeatures, TPRAtFPR, deduplicate_by_index, membership_auc, membership_roc, tpr_at_fpr,
)


def _sk_tpr_at_fpr(s, y, a):
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return tpr[fpr <= a].max()


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_roc_tpr_auc_match_sklearn(seed, ties):
    rng = np.random.default_rng(seed)
    y = rng.random(700) < 0.4
    s = rng.normal(size=700) + 0.5 * y
    if ties:
        s = np.round(s, 1)
    fpr, tpr, thr = membership_roc(torch.from_numpy(s), torch.from_numpy(y))
    f2, t2, th2 = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr.numpy(), f2)
    np.testing.assert_allclose(tpr.numpy(), t2)
    np.testing.assert_allclose(thr.numpy()[1:], th2[1:])
    for a in (0.0, 0.01, 0.05, 0.3):
        assert float(tpr_at_fpr(torch.from_numpy(s), torch.from_numpy(y), a)) == pytest.approx(_sk_tpr_at_fpr(s, y, a))
    assert float(membership_auc(torch.from_numpy(s), torch.from_numpy(y))) == pytest.approx(roc_auc_score(y, s))


def test_tpr_at_fpr_never_exceeds_target():
    # 100 negatives: FPR steps of 0.01. One negative scores above all positives, so at FPR <= 0.01
    # the TPR is 1 exactly at the point after that negative; at FPR = 0 it is 0.
    s = torch.cat([torch.tensor([10.0]), torch.zeros(99), torch.ones(5)])
    y = torch.cat([torch.zeros(100), torch.ones(5)])
    assert float(tpr_at_fpr(s, y, 0.0)) == 0.0
    assert float(tpr_at_fpr(s, y, 0.01)) == 1.0
    assert float(tpr_at_fpr(s, y, 0.0099)) == 0.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="both members and non-members"):
        tpr_at_fpr(torch.rand(5), torch.ones(5))
    with pytest.raises(ValueError, match="NaN"):
        membership_auc(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))


def test_class_twins_deduplicate():
    rng = np.random.default_rng(0)
    s, y = rng.normal(size=200), rng.random(200) < 0.5
    m1, m2, mf = TPRAtFPR(0.05), MembershipAUC(), MembershipFeatures()
    idx = torch.arange(200)
    for chunk in (slice(0, 120), slice(100, 200)):  # samples 100..119 seen twice
        for m in (m1, m2):
            m.update(torch.from_numpy(s[chunk]), torch.from_numpy(y[chunk]), idx[chunk])
        mf.update(torch.from_numpy(s[chunk]).unsqueeze(1), torch.from_numpy(y[chunk]), idx[chunk])
    assert float(m1.compute()) == pytest.approx(_sk_tpr_at_fpr(s, y, 0.05))
    assert float(m2.compute()) == pytest.approx(roc_auc_score(y, s))
    out = mf.compute()
    assert out["features"].shape == (200, 1) and torch.equal(out["index"], idx)
    u, a = deduplicate_by_index(torch.tensor([3, 1, 3, 2]), torch.tensor([30, 10, 31, 20]))
    assert u.tolist() == [1, 2, 3] and a.tolist() == [10, 20, 30]


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank, world, port, s, y, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = len(s)
    # DistributedSampler-style padding: the index list is padded by repeating its start.
    order = list(range(n)) + list(range((-n) % world))
    mine = torch.tensor(order[rank::world])
    m1, m2, mf = TPRAtFPR(0.01), MembershipAUC(), MembershipFeatures()
    m1.update(s[mine], y[mine], mine)
    m2.update(s[mine], y[mine], mine)
    mf.update(s[mine].unsqueeze(1), y[mine], mine)
    tpr, auc, feats = m1.compute(), m2.compute(), mf.compute()
    if rank == 0:
        out.put((float(tpr), float(auc), feats["features"].shape[0]))
    dist.destroy_process_group()


def test_ddp_two_processes_gloo():
    rng = np.random.default_rng(0)
    n = 301  # odd, so the sampler pads one duplicate
    s = torch.from_numpy(rng.normal(size=n) + (rng.random(n) < 0.5))
    y = torch.from_numpy(rng.random(n) < 0.5)
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, _free_port(), s, y, out), nprocs=2, start_method="spawn")
    tpr, auc, count = out.get()
    assert count == n
    assert tpr == pytest.approx(_sk_tpr_at_fpr(s.numpy(), y.numpy(), 0.01))
    assert auc == pytest.approx(roc_auc_score(y.numpy(), s.numpy()))
