"""Classifier AUC, FPD and KPD: reference checks on known distributions and hand computations."""

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rsgm.metrics.fidelity import (ClassifierAUC, PhysicsDistances, classifier_auc, expected_calibration_error,
                                   frechet_distance, frechet_physics_distance, high_level_features,
                                   kernel_physics_distance, polynomial_mmd2)
from rsgm.physics.channels import channel_masks


def gaussians(n, d=4, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d, generator=g, dtype=torch.float64)
    b[:, 0] += shift
    return a, b


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 5)), rng.standard_normal((5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    m1, m2 = rng.standard_normal(5), rng.standard_normal(5)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    got = frechet_distance(*(torch.from_numpy(t) for t in (m1, s1, m2, s2)))
    assert float(got) == pytest.approx(expected, rel=1e-9)


def test_fpd_is_zero_for_identical_and_positive_for_shifted_distributions():
    a, b = gaussians(4000)
    fpd, err = frechet_physics_distance(a, b, num_batches=5, num_points=4)
    # The intercept removes the bias of the bootstrap batch size, not the difference between the
    # two finite samples themselves: their mean difference alone has E|m1 - m2|^2 = 2 d / n
    # (= 0.002 here); a 0.5 shift gives 0.25 below.
    assert fpd <= 3 * err + 2 * 4 / 4000
    a, b = gaussians(4000, shift=0.5)
    fpd_s, err_s = frechet_physics_distance(a, b, num_batches=5, num_points=5, normalise=False)
    # Gaussians with equal covariance: FD = |mu1 - mu2|^2 = 0.25.
    assert fpd_s == pytest.approx(0.25, abs=0.05) and fpd_s > 10 * err_s


def test_polynomial_mmd2_hand_computed():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    y = torch.tensor([[0.5, 0.5], [2.0, 0.0]])
    k = lambda p, q: (float(p @ q) / 2 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(3) for j in range(3) if i != j) / 6
    yy = sum(k(y[i], y[j]) for i in range(2) for j in range(2) if i != j) / 2
    xy = sum(k(x[i], y[j]) for i in range(3) for j in range(2)) / 6
    assert float(polynomial_mmd2(x, y, degree=3)) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kpd_is_zero_for_identical_and_positive_for_shifted_distributions():
    a, b = gaussians(2000)
    kpd, err = kernel_physics_distance(a, b, batch_size=800)
    assert abs(kpd) <= 3 * err + 1e-6
    a, b = gaussians(2000, shift=0.5)
    kpd_s, err_s = kernel_physics_distance(a, b, batch_size=800)
    assert kpd_s > 5 * err_s


def test_classifier_auc_is_half_for_identical_and_high_for_shifted_distributions():
    a, b = gaussians(1000, d=3)
    same = classifier_auc(a, b, hidden=32, epochs=10, seed=0)
    assert abs(same["auc"] - 0.5) <= 3 * same["auc_err"] + 0.01
    assert same["ece"] < 0.1 and same["brier"] == pytest.approx(0.25, abs=0.02)  # calibrated at p = 0.5
    a, b = gaussians(1000, d=3, shift=2.0)
    shifted = classifier_auc(a, b, hidden=32, epochs=10, seed=0)
    # Best possible AUC for unit Gaussians 2 apart: Phi(2 / sqrt(2)) = 0.921.
    assert shifted["auc"] == pytest.approx(0.921, abs=3 * shifted["auc_err"] + 0.01)
    assert shifted["n_test"] == pytest.approx(400, abs=1)


def test_expected_calibration_error_hand_computed():
    prob = np.array([0.05, 0.05, 0.95, 0.95, 0.55])
    labels = np.array([0, 1, 1, 1, 0])
    # bins: 0 -> {0.05, 0.05} acc 0.5; 9 -> {0.95, 0.95} acc 1; 5 -> {0.55} acc 0
    expected = 2 / 5 * 0.45 + 2 / 5 * 0.05 + 1 / 5 * 0.55
    assert expected_calibration_error(prob, labels) == pytest.approx(expected)


def test_high_level_features_hand_computed():
    img = torch.zeros(1, 1, 4, 4)
    img[0, 0, 1, 1], img[0, 0, 1, 3] = 1.0, 3.0  # row 1, columns 1 and 3
    feats = high_level_features(img, channel_masks(4, 4))[0]
    assert feats[5] == 4.0  # photon sum
    assert feats[:5].sum() == 4.0  # every pixel in exactly one channel
    assert feats[6] == pytest.approx(2.5) and feats[7] == pytest.approx(1.0)  # centre: x (column), y (row)
    assert feats[8] == pytest.approx(np.sqrt(0.25 * 1.5 ** 2 + 0.75 * 0.5 ** 2)) and feats[9] == 0.0


def test_metrics_match_functions_and_drop_duplicate_indices():
    a, b = gaussians(300, d=3, shift=0.3)
    index = torch.arange(300)
    dist_metric = PhysicsDistances(fpd={"num_batches": 3, "num_points": 3}, kpd={"batch_size": 100})
    auc_metric = ClassifierAUC(classifier={"epochs": 2, "hidden": 16})
    for m in (dist_metric, auc_metric):
        m.update(a[:200], b[:200], index[:200])
        m.update(a[199:], b[199:], index[199:])  # index 199 twice, as a DDP sampler pads
    out = dist_metric.compute()
    assert out["fpd"] == pytest.approx(frechet_physics_distance(a, b, num_batches=3, num_points=3)[0])
    assert out["kpd"] == pytest.approx(kernel_physics_distance(a, b, batch_size=100)[0])
    # The metric keeps a real row and the generated row of the same condition (index) together.
    expected = classifier_auc(a, b, epochs=2, hidden=16, groups=(index, index))["auc"]
    assert auc_metric.compute()["auc"] == pytest.approx(expected)


def _ddp_worker(rank, world, port, a, b, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    n = len(a)
    idx = torch.arange(n + (-n) % world)
    idx[idx >= n] -= n
    mine = idx[rank::world]
    metric = PhysicsDistances(fpd={"num_batches": 3, "num_points": 3}, kpd={"batch_size": 200})
    metric.update(a[mine], b[mine], mine)
    out = metric.compute()
    if rank == 0:
        queue.put((out["fpd"], out["kpd"]))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_physics_distances_exact_under_two_process_ddp():
    a, b = gaussians(301, d=3, shift=0.2)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 31500 + np.random.default_rng().integers(0, 2000)
    mp.start_processes(_ddp_worker, args=(2, int(port), a, b, queue), nprocs=2, join=True, start_method="spawn")
    fpd, kpd = queue.get(timeout=5)
    assert fpd == pytest.approx(frechet_physics_distance(a, b, num_batches=3, num_points=3)[0], rel=1e-9)
    assert kpd == pytest.approx(kernel_physics_distance(a, b, batch_size=200)[0], rel=1e-9)


def test_split_rows_keeps_each_group_in_one_part():
    from rsgm.metrics.fidelity import _split_rows

    group = torch.arange(100).repeat_interleave(torch.randint(1, 6, (100,), generator=torch.Generator().manual_seed(0)))
    parts = _split_rows(group, (0.6, 0.2, 0.2), torch.Generator().manual_seed(1))
    assert sorted(torch.cat(parts).tolist()) == list(range(len(group)))
    sets = [set(group[p].tolist()) for p in parts]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert abs(len(parts[0]) / len(group) - 0.6) < 0.05


def test_grouped_split_removes_the_leak_of_repeated_conditions():
    # One distribution; each "particle" repeated 8 times with a small spread around its own centre.
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(2, 150, 5, generator=g)
    rows = centres.repeat_interleave(8, dim=1) + 0.05 * torch.randn(2, 1200, 5, generator=g)
    ids = torch.arange(300).reshape(2, 150).repeat_interleave(8, dim=1)
    leaky = classifier_auc(rows[0], rows[1], hidden=64, epochs=15, seed=0)
    grouped = classifier_auc(rows[0], rows[1], hidden=64, epochs=15, seed=0, groups=(ids[0], ids[1]))
    assert leaky["auc"] > 0.5 + 4 * leaky["auc_err"]  # memorised siblings: a false difference
    assert abs(grouped["auc"] - 0.5) <= 3 * grouped["auc_err"] + 0.02


def test_condition_ids_equal_for_equal_rows_only():
    from rsgm.metrics.fidelity import condition_ids

    cond = torch.tensor([[1.0, 2.0], [1.0, 2.0], [2.0, 1.0], [1.0, 2.5]])
    ids = condition_ids(cond)
    assert ids[0] == ids[1] and len(set(ids.tolist())) == 3
