"""CDI calibration and power from a saved features file (``features.safetensors`` of an
``rsgm test`` run on a CDI config).

    python benchmarks/cdi_calibration.py runs/cdi_digits/<run>/features.safetensors
    python benchmarks/cdi_calibration.py <features> --procedures sequential_stratified crossfit --singles
    python benchmarks/cdi_calibration.py <features> --rows no_loss:1000 gm_t300:100 --seeds 1 2 3 4 --no_power

Null table: P and U both drawn (disjointly) from the non-members, |U| = min(|P|, N - |P|),
``--trials`` trials per row; the false-positive rate at alpha = 0.01 and 0.05 against the
upper end of the binomial 95 % interval. Power table: P from the members, U from the
non-members, rejection rate at alpha = 0.01. Feature sets: all, gray-box, existing MIAs
(dl, secmi, pia, pian) and, with ``--singles``, every single feature.
"""

from __future__ import annotations

import argparse

import torch

from rsgm.lightning_modules.diffusion_attack import load_features_cache
from rsgm.privacy import stats as S
from rsgm.privacy.diffusion_features import ACCESS, feature_group

EXISTING = ("dl", "secmi", "pia", "pian")


def feature_sets(names: list[str], singles: bool) -> dict[str, list[int]]:
    sets = {"all": list(range(len(names))),
            "gray-box": [j for j, n in enumerate(names) if ACCESS.get(feature_group(n)) == "gray"],
            "existing": [j for j, n in enumerate(names) if feature_group(n) in EXISTING]}
    if singles:
        sets.update({n: [j] for j, n in enumerate(names)})
    return {k: v for k, v in sets.items() if v}


def _print_null(proc: str, name: str, n_p: int, n_u: int, seed, p) -> None:
    c1, c5 = S.null_check(p, 0.01), S.null_check(p, 0.05)
    ok = "yes" if c1["passed"] and c5["passed"] else "NO"
    print(f"{proc:<24}{name:<12}{n_p:>6}{n_u:>6}{seed!s:>7}{c1['false_positives']:>9}{c5['false_positives']:>9}"
          f"{100 * c1['false_positive_rate']:>9.1f}%{100 * c5['false_positive_rate']:>9.1f}%{c1['ks_pvalue']:>9.2g}  {ok}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("features")
    ap.add_argument("--procedures", nargs="+", default=[S.DEFAULT_PROCEDURE])
    ap.add_argument("--sizes", type=int, nargs="*", default=[10, 30, 100, 300, 1000], help="null-table sizes (none: skip)")
    ap.add_argument("--power_sizes", type=int, nargs="+", default=[10, 30, 100, 300])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--singles", action="store_true", help="also every single feature (null table only)")
    ap.add_argument("--sets", nargs="+", default=None, help="restrict to these feature sets")
    ap.add_argument("--no_power", action="store_true")
    ap.add_argument("--mia", action="store_true", help="per-feature AUC (score = -feature) and the best single MIA")
    ap.add_argument("--ablation", action="store_true", help="min |P| (mean p < 0.01) per feature set, as the callback's ablation")
    ap.add_argument("--ablation_trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=12345, help="a seed no test uses")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="repeat every null row on each of these seeds and pool the counts")
    ap.add_argument("--rows", nargs="+", default=None,
                    help="only these null rows, as SET:|P| or SET:|P|:|U| (SET: all, gray-box, existing or a feature name; |U| = min(|P|, N - |P|) if not given)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_features_cache(args.features)
    F, y = data["features"].double(), data["is_member"].bool()
    members, nonmembers = F[y], F[~y]
    sets = feature_sets(data["names"], args.singles)
    if args.sets:
        sets = {k: v for k, v in sets.items() if k in args.sets or (args.singles and len(v) == 1)}
    N = len(nonmembers)
    if args.mia:
        from rsgm.metrics.membership import membership_auc

        aucs = sorted(((float(membership_auc(-F[:, j], y)), n) for j, n in enumerate(data["names"])), reverse=True)
        print("per-feature AUC (score = -feature): " + ", ".join(f"{n} {a:.3f}" for a, n in aucs))
        print(f"best single MIA: {aucs[0][1]} AUC {aucs[0][0]:.3f}", flush=True)
    if args.ablation:
        from rsgm.callbacks.dataset_inference import DatasetInference

        cb = DatasetInference(ablation_trials=args.ablation_trials, procedure=args.procedures[0], seed=args.seed, device=args.device)
        access = [ACCESS[feature_group(n)] for n in data["names"]]
        sizes = [n for n in S.default_size_grid(min(len(members), N)) if n >= 10]
        print(f"feature-set ablation ({args.procedures[0]}, {args.ablation_trials} trials per size): min |P| with mean p < 0.01")
        for row in cb._ablation(list(data["names"]), members, nonmembers, sizes, [j for j, a in enumerate(access) if a == "gray"]):
            tail = "" if row["min_P"] else f" (not reached; mean p {row['mean_p_at_largest']:.3g} at |P| = {row['largest_P_tried']})"
            print(f"  {row['features']:<22}{row['n_features']:>4} features  min |P| = {row['min_P']}{tail}", flush=True)
    print(f"{len(members)} members, {N} non-members, {F.shape[1]} features; {args.trials} trials per row; binomial 95 % upper end: "
          f"{S.binomial_upper(args.trials, 0.01)} / {S.binomial_upper(args.trials, 0.05)} false positives at alpha 0.01 / 0.05")
    seeds = args.seeds or [args.seed]
    if args.rows:
        every = feature_sets(data["names"], True)
        rows = [(r.split(":")[0], *map(int, r.split(":")[1:])) for r in args.rows]
        unknown = [row[0] for row in rows if row[0] not in every]
        if unknown:
            raise SystemExit(f"unknown feature set(s) {unknown}; choose from {sorted(every)}")
    else:
        every, rows = sets, [(name, n_p) for name in sets for n_p in args.sizes]
    rows = [(name, n_p, rest[0] if rest else min(n_p, N - n_p)) for name, n_p, *rest in rows]
    if len(seeds) > 1:
        print(f"seeds {seeds}: each row {len(seeds)} x {args.trials} trials; pooled counts against the binomial 95 % upper end of "
              f"{len(seeds) * args.trials} trials: {S.binomial_upper(len(seeds) * args.trials, 0.01)} / {S.binomial_upper(len(seeds) * args.trials, 0.05)}")
    print(f"{'procedure':<24}{'features':<12}{'|P|':>6}{'|U|':>6}{'seed':>7}{'FP@0.01':>9}{'FP@0.05':>9}{'FPR@0.01':>10}{'FPR@0.05':>10}{'KS p':>9}  within")
    for proc in args.procedures:
        for name, n_p, n_u in rows:
            cols = every[name]
            if n_u < 10 or n_p + n_u > N:
                continue
            pooled = []
            for seed in seeds:
                null = S.null_experiment(nonmembers[:, cols], n_p, args.trials, alpha=0.01, seed=seed + n_p, device=args.device,
                                         procedure=proc, n_u=n_u)
                pooled.append(null["p_values"])
                _print_null(proc, name, n_p, n_u, seed, null["p_values"])
            if len(seeds) > 1:
                _print_null(proc, name, n_p, n_u, "all", torch.cat(pooled))
    if args.no_power:
        return
    print("\nPower on members (P members, U non-members, |U| = |P|): rejection rate at alpha = 0.01, mean p")
    print(f"{'procedure':<24}{'features':<12}" + "".join(f"{'|P|=' + str(n):>18}" for n in args.power_sizes))
    for proc in args.procedures:
        for name in [k for k in ("all", "gray-box", "existing") if k in sets]:
            rows = S.pvalue_curve(members[:, sets[name]], nonmembers[:, sets[name]], args.power_sizes, args.trials, seed=args.seed,
                                  alpha=0.01, progress=False, device=args.device, procedure=proc)
            cells = "".join(f"{100 * r['reject_rate']:>8.1f}% {r['mean_p']:>8.2g}" for r in rows)
            print(f"{proc:<24}{name:<12}{cells}", flush=True)


if __name__ == "__main__":
    main()
