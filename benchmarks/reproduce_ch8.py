"""Chapter 8 (CDI): the thesis's numbers beside rsgm's on the built-in digits targets.

    python benchmarks/reproduce.py --chapter 8
    python benchmarks/reproduce_ch8.py --trials 1000 --progress runs/cdi_digits_progress_fit/<fit run>

Targets (train them first; a missing one is reported and skipped):
    rsgm fit --config configs/dm_digits.yaml                                   # "easy": 300 digits, 400 epochs
    rsgm fit --config configs/dm_digits.yaml --config configs/dm_digits_hard.yaml   # "hard": 898 digits, 30 epochs
    rsgm fit --config configs/dm_digits.yaml --config configs/cdi_digits_progress_fit.yaml   # checkpoints for --progress

Features are extracted once per target through ``rsgm test`` (``cdi_digits.yaml`` +
``cdi_clid.yaml`` + ``cdi_extract_only.yaml``, and the PIA/PIAN L2 variant via
``cdi_pia_l2.yaml``) into ``<run_dir>/<target>_*.safetensors`` and reused; every table is then
computed from those caches with :mod:`rsgm.privacy.stats` and :mod:`rsgm.privacy.cdi_extras`,
with the calibrated default procedure (``sequential_permutation``; ``--procedure sequential_stratified`` is its Welch variant, ``--procedure crossfit`` is
the thesis's own). Rows that need ImageNet / COCO models and a GPU are printed with that reason
(``configs/cdi_dit256.yaml`` exists and stops in one line without its data).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

import reproduce_common

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rsgm.callbacks.membership import per_feature_mia  # noqa: E402
from rsgm.privacy import cdi_extras as X  # noqa: E402
from rsgm.privacy import stats as S  # noqa: E402
from rsgm.privacy.diffusion_features import ACCESS, feature_group  # noqa: E402
from rsgm.privacy.features_cache import load_features_cache  # noqa: E402

TARGETS = {"easy": ("dm_digits", []), "hard": ("dm_digits_hard", ["configs/cdi_digits_hard.yaml"])}
GPU_ONLY = "needs the thesis's ImageNet/COCO models and data (a GPU for extraction); configs/cdi_dit256.yaml"
# Thesis values over its 8 DMs (LDM256, U-ViT256, DiT256, U-ViT512, DiT512, Uncond, T2I, T2I-Deep).
THESIS_AUC = {"dl": "50.0-60.8", "secmi": "49.6-69.2", "pia": "49.0-71.2", "pian": "49.1-50.7", "gm": "51.7-66.8",
              "ml": "51.8-64.3", "no": "51.9-58.0", "clid": "46.0-78.7 (Tab. D.9.6)"}
THESIS_TPR = {"dl": "1.22-2.25", "secmi": "1.16-2.41", "pia": "1.12-5.57", "pian": "0.78-1.52", "gm": "1.07-4.71",
              "ml": "1.31-3.10", "no": "1.25-1.81", "clid": "1.52-24.11 (Tab. C.8.1)"}


def print_table(title, header, rows, note: str = "") -> str:
    """reproduce_common.print_table with "|" inside cells escaped for Markdown."""
    esc = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    return reproduce_common.print_table(title, [esc(h) for h in header], [[esc(c) for c in r] for r in rows], note)


def rsgm_cli(args: list[str], run_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RSGM_RUN_DIR"} | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                                                                          "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "rsgm.cli", "test", *args, "--logger", "csv", "--run_dir", str(run_dir / "runs"),
           "--trainer.enable_progress_bar", "false"]
    print("$ rsgm " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def extract(name: str, model_dir: Path, run_dir: Path) -> tuple[dict, dict] | None:
    folder, overlays = TARGETS[name]
    path = model_dir / folder
    if not (path / "membership.json").is_file():
        print(f"{name} target: {path} not found; train it first (see this script's docstring). Skipped.")
        return None
    common = ["--config", "configs/cdi_digits.yaml", *sum((["--config", o] for o in overlays), []),
              "--model.target.init_args.path", str(path), "--data.init_args.split_file", str(path / "membership.json")]
    main, l2 = run_dir / f"{name}_features.safetensors", run_dir / f"{name}_pia_l2.safetensors"
    if not main.is_file():
        rsgm_cli([*common, "--config", "configs/cdi_clid.yaml", "--config", "configs/cdi_extract_only.yaml", "--model.features_cache", str(main)], run_dir)
    if not l2.is_file():
        rsgm_cli([*common, "--config", "configs/cdi_extract_only.yaml", "--model.features", "[pia, pian]",
                  "--model.feature_options", "{pia_p: 2.0, max_batch: 2048}", "--model.features_cache", str(l2)], run_dir)
    return load_features_cache(main), load_features_cache(l2)


def cols(names, keep) -> list[int]:
    return [j for j, n in enumerate(names) if keep(n)]


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def analyse(name: str, data: dict, l2: dict, a) -> list[str]:
    names, F, y = list(data["names"]), data["features"].double(), data["is_member"].bool()
    assert torch.equal(l2["index"], data["index"])
    M, N = F[y], F[~y]
    cap = min(len(M), len(N) // 2)  # the null experiments draw P' and U' from the non-members
    sizes = [n for n in S.default_size_grid(min(len(M), len(N))) if n >= 10]
    kw = dict(trials=a.trials, k=5, C=1.0, alpha=0.01, seed=a.seed, device="cpu", procedure=a.procedure)
    base = cols(names, lambda n: feature_group(n) != "clid")
    gray = [j for j in base if ACCESS[feature_group(names[j])] == "gray"]
    out = []
    tag = f"{name} target ({len(M)} members, {len(N)} non-members)"

    # Per-feature MIA (Tables C.21.1 / C.21.3 / C.8.1), PIA and PIAN with p = 5 and p = 2.
    l2n = [f"{n}_l2" for n in l2["names"]]
    mia = per_feature_mia(names + l2n, torch.cat([F, l2["features"].double()], 1), data["is_member"], 0.01, a.seed)
    rows = []
    for g in ["dl", "secmi", "pia", "pia_l2", "pian", "pian_l2", "gm", "ml", "no", "clid"]:
        cand = [r for r in mia if r["feature"] == g or (g in ("gm", "ml", "no", "clid") and feature_group(r["feature"]) == g)]
        if not cand:
            continue
        best = max(cand, key=lambda r: r["auc"])
        label = {"pia": "PIA (p=5, thesis)", "pia_l2": "PIA (p=2)", "pian": "PIAN (p=5, thesis)", "pian_l2": "PIAN (p=2)"}.get(g, g)
        key = g.split("_")[0]
        rows.append([label, best["feature"], THESIS_TPR[key], pct(best["tpr_at_fpr"]), THESIS_AUC[key], pct(best["auc"])])
    lr = next(r for r in mia if r["feature"] == "lr_all")
    rows.append(["LR over all features (cross-fitted)", "lr_all", "-", pct(lr["tpr_at_fpr"]), "-", pct(lr["auc"])])
    out.append(print_table(f"{tag}: per-feature MIA (Tables C.21.1, C.21.3, C.8.1)",
                           ["feature", "best column", "thesis TPR@1%FPR (%)", "rsgm", "thesis AUC (%)", "rsgm"], rows,
                           "Thesis: range over its 8 DMs; rsgm: best column of the group, score = -feature, all members vs all non-members."))

    # PIA norm: min |P| of CDI on the existing MIAs with p = 5 vs p = 2.
    ex = cols(names, lambda n: feature_group(n) in X.EXISTING_GROUPS)
    F2 = F.clone()
    for j2, n2 in enumerate(l2["names"]):
        F2[:, names.index(n2)] = l2["features"][:, j2].double()
    rows = []
    for label, FF in (("p = 5 (thesis, default)", F), ("p = 2 (configs/cdi_pia_l2.yaml)", F2)):
        n5, r5 = X.search_min_size(FF[y][:, ex], FF[~y][:, ex], sizes, **{k: kw[k] for k in ("trials", "k", "C", "alpha", "seed", "device", "procedure")})
        nb, _ = X.search_min_size(FF[y][:, base], FF[~y][:, base], sizes, **{k: kw[k] for k in ("trials", "k", "C", "alpha", "seed", "device", "procedure")})
        rows.append([label, n5, nb])
    out.append(print_table(f"{tag}: PIA/PIAN norm order, min |P| (mean p < 0.01)", ["PIA norm", "existing MIAs", f"all {len(base)} base features"], rows))

    # Min |P|: base CDI, gray-box (Table C.12.2), + CLiD (Table C.8.2); false positives (Table 8.5.2).
    srch = {k: kw[k] for k in ("trials", "k", "C", "alpha", "seed", "device", "procedure")}
    allc = list(range(len(names)))
    n_base, _ = X.search_min_size(M[:, base], N[:, base], sizes, **srch)
    n_gray, _ = X.search_min_size(M[:, gray], N[:, gray], sizes, **srch)
    n_clid, _ = X.search_min_size(M, N, sizes, **srch) if len(allc) > len(base) else (None, None)
    clid_only = cols(names, lambda n: feature_group(n) == "clid")
    n_clid1, _ = X.search_min_size(M[:, clid_only], N[:, clid_only], sizes, **srch) if clid_only else (None, None)
    big = S.pvalue_curve(M[:, base], N[:, base], [cap], progress=False, **kw)[0]
    null = S.null_experiment(N[:, base], cap, a.trials, 5, 0.01, 1.0, a.seed + 1, "cpu", a.procedure)
    rows = [["min |P|, white-box CDI (all base features)", "70-6000 (Tab. 5.4)", n_base],
            ["min |P|, gray-box CDI (Tab. C.12.2)", "70-8000", n_gray],
            ["min |P|, CDI + CLiD features (Tab. C.8.2)", "30-4000", n_clid],
            ["min |P|, CLiD features alone", "-", n_clid1],
            [f"mean p, P members, |P| = {cap} (Tab. 8.5.2, |P| = 10000)", "1e-6 ... 0", f"{big['mean_p']:.3g}"],
            [f"mean p, P non-members, |P| = {cap} (Tab. 8.5.2)", "0.38-0.40", f"{null['mean_p']:.3f}"],
            [f"false-positive rate at alpha = 0.01, |P| = {cap}", "-", f"{100 * null['false_positive_rate']:.1f} % (at most {S.binomial_upper(a.trials, 0.01)} of {a.trials} allowed)"]]
    out.append(print_table(f"{tag}: CDI min |P| and false positives ({a.trials} trials per |P|, procedure {a.procedure})",
                           ["quantity", "thesis (8 DMs)", "rsgm"], rows))

    # Table 8.5.1 (set-level max-score MIA vs CDI) and App. C.18 / C.19 (ROC vs single MIAs on DI).
    sP, sU = X.crossfit_scores(M[:, base], N[:, base], 5, a.seed)
    rows, roc = [], []
    for n in [s for s in (10, 30, 100, 300) if s <= cap and s < len(M)]:  # |P| = |M| would repeat one set
        row = S.pvalue_curve(M[:, base], N[:, base], [n], progress=False, **kw)[0]
        pn = S.null_experiment(N[:, base], n, a.trials, 5, 0.01, 1.0, a.seed + 2, "cpu", a.procedure)["p_values"]
        sl = X.set_level_mia(sP, sU, n, a.sets, 0.01, a.seed + n)
        tpr_emp = S.pvalue_to_tpr(row["p_values"], pn, 0.01)
        rows.append([n, "0.0-33.4", pct(sl["tpr_at_fpr"]), f"{pct(sl['calibrated_tpr'])} / {pct(sl['calibrated_fpr'])}",
                     "24.9-100", pct(row["power_tpr"]), pct(tpr_emp)])
        fpr, tpr = X.pvalue_roc(row["p_values"], pn)
        alpha_rows = X.cdi_alpha_roc(row["p_values"], pn, [0.001, 0.01, 0.05, 0.1])
        mia_rows = X.mia_on_di(names, M, N, [n], a.sets, 0.01, a.seed)
        best = max(mia_rows, key=lambda r: r["auc"])
        roc.append([n, pct(tpr_emp), pct(float(torch.trapezoid(tpr, fpr))), " / ".join(pct(r["tpr"]) for r in alpha_rows),
                    " / ".join(pct(r["fpr_measured"]) for r in alpha_rows), best["method"], pct(best["tpr_at_fpr"]), pct(best["auc"])])
    out.append(print_table(f"{tag}: statistical test vs set-level MIA, TPR@FPR=1 % in % (Table 8.5.1; thesis |P| = 1000)",
                           ["|P|", "thesis set-level MIA", "rsgm set-level MIA", "rsgm calibrated threshold TPR / FPR", "thesis CDI", "rsgm CDI (power, C.17)", "rsgm CDI (empirical)"], rows,
                           f"Set score = max cross-fitted LR score in the set; {a.sets} member sets vs {a.sets} non-member sets."))
    out.append(print_table(f"{tag}: CDI ROC over alpha (App. C.18) vs the best existing MIA on the DI task (App. C.19)",
                           ["|P|", "CDI TPR@1%FPR", "CDI AUC", "CDI TPR at alpha = 0.001/0.01/0.05/0.1", "measured FPR at those alpha",
                            "best single MIA", "its TPR@1%FPR", "its AUC"], roc,
                           "Thesis: CDI reaches TPR 1 at FPR 0 for large |P|; MIAs with the max rule stay far below (Fig. C.19.1)."))

    # Fig. 8.5.2: feature-set ablation, base features.
    bnames = [names[j] for j in base]
    access = {n: ACCESS[feature_group(n)] for n in bnames}
    rows = []
    for label, cc in X.ablation_sets(bnames, ["singles", "existing_singles", "pairs", "triples", "all", "all_gray_box"], access=access):
        n, rr = X.search_min_size(M[:, base][:, cc], N[:, base][:, cc], sizes, **{**srch, "trials": a.ablation_trials})
        rows.append([label, len(cc), n if n else f"not reached (mean p {rr[-1]['mean_p']:.2g} at {rr[-1]['n_p']})"])
    out.append(print_table(f"{tag}: feature-set ablation, min |P| (Fig. 8.5.2; {a.ablation_trials} trials per |P|)", ["features", "k", "min |P|"], rows,
                           "Thesis (U-ViT512): existing MIAs 20000, all features 2000; GM the most influential new feature."))

    # Table C.12.1: |U|/|P| imbalance.
    thesis_imb = {1.0: "70-6000", 0.9: "70-6000", 0.75: "70-6000", 0.5: "90-6000", 0.25: "200-7000", 0.1: "300-8000"}
    imb = X.imbalance_study(M[:, base], N[:, base], list(thesis_imb), sizes, **{k: kw[k] for k in ("trials", "k", "C", "alpha", "seed", "device", "procedure")})
    out.append(print_table(f"{tag}: min |P| under |U| = ratio x |P| (Table C.12.1)", ["|U|/|P|", "thesis (7 DMs)", "rsgm"],
                           [[r["u_ratio"], thesis_imb[r["u_ratio"]], r["min_P"]] for r in imb]))
    return out


def progress(fit_run: Path, a) -> list[str]:
    ckpts = sorted((fit_run / "checkpoints").glob("epoch*.ckpt"))
    if not ckpts:
        print(f"--progress: no checkpoints/epoch*.ckpt under {fit_run}")
        return []
    split = a.model_dir / "dm_digits" / "membership.json"
    rows = []
    for ck in ckpts:
        cache = a.run_dir / f"progress_{ck.stem}.safetensors"
        if not cache.is_file():
            rsgm_cli(["--config", "configs/cdi_digits.yaml", "--config", "configs/cdi_digits_progress.yaml", "--config", "configs/cdi_extract_only.yaml",
                      "--model.target.init_args.checkpoint", str(ck), "--data.init_args.split_file", str(split),
                      "--model.features", "[dl, secmi, pia, pian, ml]", "--model.features_cache", str(cache)], a.run_dir)
        d = load_features_cache(cache)
        y = d["is_member"].bool()
        M, N = d["features"].double()[y], d["features"].double()[~y]
        sizes = [n for n in S.default_size_grid(min(len(M), len(N) // 2)) if n >= 10]
        n, _ = X.search_min_size(M, N, sizes, a.trials, 5, 1.0, 0.01, a.seed, "cpu", a.procedure)
        row30 = S.pvalue_curve(M, N, [30], a.trials, 5, progress=False, seed=a.seed, procedure=a.procedure)[0]
        epoch = int(ck.stem.removeprefix("epoch")) + 1
        rows.append([epoch, epoch * 5, f"{row30['mean_p']:.3g}", n])
    return [print_table("Training progress, easy target, gray-box features (App. C.11)", ["epoch", "steps", "mean p at |P| = 30", "min |P|"], rows,
                        "Thesis (U-ViT256-Uncond, checkpoints every 100k steps): with |P| = 2000, H0 is rejected after 100k steps.")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="*", default=["easy", "hard"], choices=sorted(TARGETS), help="none with --progress alone")
    p.add_argument("--model_dir", type=Path, default=Path("models"))
    p.add_argument("--run_dir", type=Path, default=Path("runs/reproduce_ch8"))
    p.add_argument("--trials", type=int, default=1000, help="resampled (P, U) cases per |P| (the thesis: 1000)")
    p.add_argument("--ablation_trials", type=int, default=200)
    p.add_argument("--sets", type=int, default=1000, help="member / non-member sets for the set-level MIAs (thesis: 1000)")
    p.add_argument("--procedure", default=S.DEFAULT_PROCEDURE, choices=S.PROCEDURES)
    p.add_argument("--progress", type=Path, help="a fit run folder of cdi_digits_progress_fit.yaml: audit every checkpoint")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.model_dir, a.run_dir = (ROOT / a.model_dir).resolve() if not a.model_dir.is_absolute() else a.model_dir, (ROOT / a.run_dir if not a.run_dir.is_absolute() else a.run_dir)
    a.run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for name in a.targets:
        got = extract(name, a.model_dir, a.run_dir)
        if got:
            analyse(name, *got, a)
    if a.progress:
        progress(a.progress if a.progress.is_absolute() else ROOT / a.progress, a)
    print_table("Rows not run here", ["thesis rows", "reason"],
                [["Tables 5.4 / 8.5.1 / 8.5.2 / C.8.1-C.8.3 / C.12.1 / C.12.2 / C.21.x on LDM, U-ViT, DiT, SiT, MDT, DiMR", GPU_ONLY],
                 ["App. C.11 on U-ViT256-Uncond (1M steps)", "needs the COCO-trained U-ViT checkpoints; the digits target's checkpoints stand in (--progress)"]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
