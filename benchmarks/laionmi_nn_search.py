"""Cost of the exact nearest-neighbour search of LAION-mi de-duplication (rsgm.privacy.laionmi_build).

Random unit vectors of CLIP ViT-L/14's width (768) at the published table sizes (26,874
non-members against 13,396 members), and a larger screen, timed against the baseline
sklearn NearestNeighbors(algorithm="brute") in the same run. Prints one table.

    python benchmarks/laionmi_nn_search.py [--scale 1.0] [--device cpu]
"""

import argparse
import time

import numpy as np
import torch

from rsgm.privacy.laionmi_build import nearest_distances


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the table sizes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dim", type=int, default=768)
    a = p.parse_args()
    from sklearn.neighbors import NearestNeighbors

    nq, nk = int(26874 * a.scale), int(13396 * a.scale)
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(nq, a.dim, generator=g), dim=1)
    k = torch.nn.functional.normalize(torch.randn(nk, a.dim, generator=g), dim=1)
    t0 = time.perf_counter()
    d, i = nearest_distances(q, k, normalize=False, device=a.device)
    t_rsgm = time.perf_counter() - t0
    t0 = time.perf_counter()
    d_ref, i_ref = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(k.numpy()).kneighbors(q.numpy())
    t_sk = time.perf_counter() - t0
    agree = float((i.numpy() == i_ref[:, 0]).mean())
    gflop = 2 * nq * nk * a.dim / 1e9
    print(f"exact NN, {nq} queries x {nk} keys x {a.dim} dims ({gflop:.0f} GFLOP), threads={torch.get_num_threads()}, device={a.device}")
    print(f"{'method':<40}{'seconds':>10}{'GFLOP/s':>10}")
    print(f"{'rsgm nearest_distances (batched matmul)':<40}{t_rsgm:>10.2f}{gflop / t_rsgm:>10.1f}")
    print(f"{'sklearn NearestNeighbors brute':<40}{t_sk:>10.2f}{gflop / t_sk:>10.1f}")
    print(f"same nearest neighbour: {100 * agree:.2f} %; max |distance difference| {np.abs(d.numpy() - d_ref[:, 0]).max():.2e}")


if __name__ == "__main__":
    main()
